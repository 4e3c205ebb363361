"""Quantizer primitives against an independent numpy computation."""
import numpy as np
import pytest
import torch

from repq.quant.primitives import (asymmetric_params, dequantize, fake_quantize, int_range, quantize, round_codes,
                                   symmetric_scale)


def np_quant(x, scale, zp, qmin, qmax):
    return np.clip(np.round(x / scale) + zp, qmin, qmax)  # numpy rounds half to even


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 16])
@pytest.mark.parametrize("signed", [True, False])
def test_per_tensor_matches_numpy(bits, signed):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(4, 3, 5, 5)).astype(np.float32) * 3
    qmin, qmax = int_range(bits, signed)
    assert (qmin, qmax) == ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1))
    scale, zp = 0.037, (0 if signed else 2 ** (bits - 1))
    codes = quantize(torch.from_numpy(x), scale, zp, qmin, qmax)
    expected = np_quant(x.astype(np.float64), np.float32(scale), zp, qmin, qmax)
    assert np.array_equal(codes.numpy(), expected)
    assert codes.min() >= qmin and codes.max() <= qmax
    deq = dequantize(codes, scale, zp)
    assert np.allclose(deq.numpy(), (expected - zp) * scale, atol=1e-6)


def test_per_channel_matches_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)
    amax = np.abs(w).reshape(6, -1).max(axis=1)
    scale = amax / 127
    codes = quantize(torch.from_numpy(w), torch.from_numpy(scale), 0, -127, 127, axis=0).numpy()
    expected = np.clip(np.round(w / scale[:, None, None, None]), -127, 127)
    assert np.array_equal(codes, expected)
    assert np.abs(codes).reshape(6, -1).max(axis=1).tolist() == [127] * 6  # the max hits the top code
    fq = fake_quantize(torch.from_numpy(w), torch.from_numpy(scale), 0, -127, 127, axis=0).numpy()
    assert np.abs(fq - w).max() <= scale.max() / 2 + 1e-6


def test_rounding_modes():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert round_codes(x, "half_even").tolist() == [-2, -2, -0, 0, 2, 2]
    assert round_codes(x, "half_up").tolist() == [-2, -1, 0, 1, 2, 3]
    with pytest.raises(ValueError):
        round_codes(x, "stochastic")


def test_asymmetric_params_cover_range_and_zero():
    scale, zp = asymmetric_params(torch.tensor(-1.0), torch.tensor(3.0), 8)
    assert torch.isclose(scale, torch.tensor(4.0 / 255))
    assert dequantize(zp.clone(), scale, zp) == 0.0  # zero is exactly representable
    codes = quantize(torch.tensor([-1.0, 3.0]), scale, zp, 0, 255)
    assert codes.tolist() == [0, 255]


def test_symmetric_scale_guards_zero():
    s = symmetric_scale(torch.tensor([0.0, 2.54]), 127)
    assert s.tolist() == pytest.approx([1.0, 0.02])
    with pytest.raises(ValueError):
        int_range(1, True)

"""CFWS and the other weight quantizers, checked against a plain numpy re-implementation of methods.md section 2."""
import numpy as np
import pytest
import torch

import repq
from repq.quant.weights import quantize_cfws, quantize_cfws_whole, quantize_minmax, quantize_mse, quantize_weight


def numpy_cfws(w: np.ndarray, qmax: int = 127, per_channel: bool = True) -> np.ndarray:
    """Step-by-step CFWS from the spec, written independently in float64."""
    w = w.astype(np.float64)
    center = w[:, :, 1, 1]
    amax_c = np.abs(center).max(axis=1) if per_channel else np.full(w.shape[0], np.abs(center).max())
    s_c = np.where(amax_c > 0, amax_c / qmax, 1.0)
    n_c = np.clip(np.floor(center / s_c[:, None] + 0.5), -qmax, qmax)
    coarse = s_c[:, None] * n_c
    fine_in = w.copy()
    fine_in[:, :, 1, 1] = center - coarse
    amax_f = np.abs(fine_in).reshape(w.shape[0], -1).max(axis=1)
    s_f = np.where(amax_f > 0, amax_f / qmax, 1.0)
    fine = np.clip(np.round(fine_in / s_f[:, None, None, None]), -qmax, qmax) * s_f[:, None, None, None]
    out = fine.copy()
    out[:, :, 1, 1] += coarse
    return out


def center_heavy_kernel(seed=0, out_ch=16, in_ch=16, spike=40.0):
    """A merged RepVGG kernel: small 3x3 weights plus a large identity/1x1 term on the center diagonal."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_ch, in_ch, 3, 3, generator=gen) * 0.05
    w[:, :, 1, 1] += torch.randn(out_ch, in_ch, generator=gen) * 0.2
    idx = torch.arange(min(out_ch, in_ch))
    w[idx, idx, 1, 1] += spike * (0.5 + torch.rand(len(idx), generator=gen))
    return w


def mse(a, b):
    return float(((a - b) ** 2).mean())


@pytest.mark.parametrize("per_channel", [True, False])
def test_cfws_matches_numpy_reference(per_channel):
    w = center_heavy_kernel(1)
    ours = quantize_cfws(w, 8, per_channel).dequantize().double().numpy()
    ref = numpy_cfws(w.numpy(), 127, per_channel)
    assert np.allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_cfws_never_worse_than_per_channel_minmax(seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 8, 3, 3, generator=gen) * torch.rand(12, 1, 1, 1, generator=gen)
    for bits in (4, 6, 8):
        assert mse(quantize_cfws(w, bits).dequantize(), w) <= mse(quantize_minmax(w, bits).dequantize(), w) * 1.0001


@pytest.mark.parametrize("bits", [4, 8])
def test_cfws_ten_times_better_on_center_heavy_kernels(bits):
    w = center_heavy_kernel(2)
    err_cfws = mse(quantize_cfws(w, bits).dequantize(), w)
    err_minmax = mse(quantize_minmax(w, bits, per_channel=True).dequantize(), w)
    assert err_cfws * 10 <= err_minmax


def test_coarse_part_is_center_only_and_split_adds_up():
    w = center_heavy_kernel(3)
    coarse, fine = repq.cfws_split(w, bits=8)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1, 1] = False
    assert coarse[:, :, mask].abs().max() == 0 and coarse[:, :, 1, 1].abs().max() > 0
    assert torch.allclose(coarse + fine, w, atol=float(w.abs().max()) / 127)
    q = quantize_cfws(w, 8)
    assert q.coarse_codes.shape == (16, 16, 1, 1)
    assert q.codes.abs().max() <= 127 and q.coarse_codes.abs().max() <= 127


def test_all_zero_center_channel():
    w = center_heavy_kernel(4)
    w[3, :, 1, 1] = 0
    w[5] = 0
    q = quantize_cfws(w, 8)
    assert torch.isfinite(q.dequantize()).all()
    assert q.coarse_codes[3].abs().max() == 0 and q.dequantize()[5].abs().max() == 0


def test_cfws_whole_and_mse():
    w = center_heavy_kernel(5)
    whole = quantize_cfws_whole(w, 8)
    assert whole.coarse_codes.shape == w.shape
    assert mse(whole.dequantize(), w) < mse(quantize_minmax(w, 8).dequantize(), w)
    for per_channel in (True, False):
        m = quantize_mse(w, 4, per_channel)
        assert mse(m.dequantize(), w) <= mse(quantize_minmax(w, 4, per_channel).dequantize(), w) + 1e-12


def test_mse_quantizer_is_brute_force_optimum_over_its_grid():
    w = torch.randn(1, 4, 3, 3)
    w[0, 0, 1, 1] = 8.0
    best = min(mse(quantize_minmax_at_ratio(w, r), w) for r in np.linspace(0.2, 1.0, 100))
    assert mse(quantize_mse(w, 4).dequantize(), w) == pytest.approx(best, rel=1e-5)


def quantize_minmax_at_ratio(w, ratio, bits=4):
    scale = float(w.abs().max()) * ratio / (2 ** (bits - 1) - 1)
    return torch.clamp(torch.round(w / scale), -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) * scale


def test_cfws_on_unsupported_shapes_falls_back_or_fails_clearly():
    lin = torch.randn(10, 20)
    assert quantize_weight(lin, "cfws", 8).coarse_codes is None  # classifier: per-channel min-max
    with pytest.raises(repq.RepqError, match="CFWS"):
        quantize_cfws(torch.randn(4, 4, 2, 2))
    bad = torch.randn(4, 4, 3, 3)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(repq.RepqError, match="NaN/Inf"):
        quantize_weight(bad, "cfws")
    with pytest.raises(repq.RepqError, match="unknown weight method"):
        quantize_weight(bad.nan_to_num(), "adaround")

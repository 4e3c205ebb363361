"""`activation="auto"`: the consumer-aware choice, the global guard, all-zero activations, bias correction."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repq


def planted(outlier_weight: float) -> nn.Module:
    """Two input channels; channel 0 carries rare large values (planted in the images). conv1 passes both channels
    through a ReLU; conv2 reads channel 0 with `outlier_weight` and channel 1 with 1: with weight 0 the large values
    cannot change conv2's output, with weight 1 they dominate it."""
    conv1 = nn.Conv2d(2, 2, 1)
    conv2 = nn.Conv2d(2, 3, 1)
    with torch.no_grad():
        conv1.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
        conv1.bias.zero_()
        rows = [[outlier_weight, 1.0], [outlier_weight, -0.5], [0.0, 0.7]]
        conv2.weight.copy_(torch.tensor(rows).reshape(3, 2, 1, 1))
        conv2.bias.zero_()
    head = nn.Linear(3, 4)
    return nn.Sequential(conv1, nn.ReLU(), conv2, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), head).eval()


def planted_images(n: int = 32, outliers: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 16, 16, generator=gen).abs()
    for k in torch.randperm(n * 16 * 16, generator=gen)[:outliers].tolist():
        x[k // 256, 0, (k % 256) // 16, k % 16] = 40.0
    return x


def conv2_range(q: nn.Module) -> tuple[str, float]:
    spec = q.repq_quant["layers"]["2"]
    levels = 2 ** (spec["a_bits"] - 1) - 1 if spec["input_signed"] else 2 ** spec["a_bits"] - 1
    return spec["calibrator"], spec["input_scale"] * levels


@pytest.mark.filterwarnings("ignore:no re-parameterizable block")
@pytest.mark.parametrize("unsigned", [True, False])
def test_auto_keeps_large_values_that_matter_and_clips_those_that_do_not(unsigned):
    images = planted_images()
    top = float(images.max())
    cfg = repq.PTQConfig(num_samples=32, unsigned_activations=unsigned, equalize=False)   # the ranges alone
    matters = repq.quantize(planted(1.0), images, cfg)
    method, amax = conv2_range(matters)
    assert amax >= 0.9 * top, f"{method} clipped values that feed conv2 ({amax} of {top})"
    harmless = repq.quantize(planted(0.0), images, cfg)
    method, amax = conv2_range(harmless)
    assert amax <= 0.5 * top, f"{method} kept a range ({amax} of {top}) whose top values conv2 ignores"


def consumer_error(model_q, model_f, images, label):
    """Independent check of the scoring: the range of `label` fitted on the images, and conv2's output error
    after its ReLU on the same images, computed by hand from the integer grid (input codes, weight codes, bias on
    the s_x * s_w grid)."""
    from repq.quant.calibrators import CalibrationConfig, compute_amax
    from repq.quant.selection import CANDIDATES
    layer = model_q[2]
    method, pct = CANDIDATES[label]
    qmax = 255 if not layer.input_quantizer.signed else 127
    x = F.relu(model_f[0](images))
    s_x = compute_amax(x, CalibrationConfig(method=method, percentile=pct or 99.99, signed=qmax == 127)) / qmax
    x_q = torch.clamp(torch.round(x / s_x), 0 if qmax == 255 else -128, qmax) * s_x
    w = layer.weight_codes.float() * layer.weight_scale[:, None, None, None]
    step = s_x * layer.weight_scale
    got = F.relu(F.conv2d(x_q, w, torch.round(layer.bias / step) * step))
    return float(((got - F.relu(model_f[2](x))) ** 2).mean())


@pytest.mark.filterwarnings("ignore:no re-parameterizable block")
@torch.no_grad()
def test_auto_reports_the_candidate_with_the_smallest_consumer_error():
    images = planted_images()
    model = planted(1.0)
    q = repq.quantize(model, images, repq.PTQConfig(num_samples=32, guard=False, bias_correction=False,
                                                    equalize=False))
    choice = q.repq_quant["auto"]["choices"]["2"]
    assert choice["method"] == min(choice["errors"], key=lambda k: (choice["errors"][k], -choice["candidates"][k]))
    for label in ("minmax", "p99.9", "mse"):
        assert choice["errors"][label] == pytest.approx(consumer_error(q, model, images, label), rel=1e-4)


@pytest.mark.filterwarnings("ignore:no re-parameterizable block")
def test_guard_falls_back_where_the_choice_hurts_the_network():
    images = planted_images()
    # only a clipping candidate is offered: it cuts the planted values that conv2 needs
    q = repq.quantize(planted(1.0), images, repq.PTQConfig(num_samples=32, auto_candidates=("p99.9",)))
    guard = q.repq_quant["auto"]["guard"]
    assert "2" in guard["fallbacks"]
    assert guard["final_error"] < guard["auto_error"]
    assert q.repq_quant["layers"]["2"]["calibrator"] == "p99.99"
    assert q.repq_quant["auto"]["choices"]["2"]["guard_fallback"]
    # without the guard the clipped choice stays
    unguarded = repq.quantize(planted(1.0), images, repq.PTQConfig(num_samples=32, auto_candidates=("p99.9",),
                                                                    guard=False))
    assert unguarded.repq_quant["layers"]["2"]["calibrator"] == "p99.9"
    assert unguarded.repq_quant["auto"]["guard"] is None


@pytest.mark.filterwarnings("ignore:no re-parameterizable block")
def test_default_survives_all_zero_channels_and_layers():
    model = planted(1.0)
    with torch.no_grad():
        model[0].weight[1].zero_()              # channel 1 of conv2's input: always zero
        model[2].weight.zero_()                 # conv2 outputs only its bias: zero, so the head's input is all zero
    images = planted_images()
    for bits in (8, 4):
        q = repq.quantize(model, images, repq.PTQConfig(num_samples=32, w_bits=bits, a_bits=bits))
        out = q(images)
        assert torch.isfinite(out).all()
        # the head sees zeros either way: its output is its bias, on the bias grid of the quantized head
        assert torch.allclose(out, model(images), atol=0.1 if bits == 4 else 0.01)


def test_default_on_a_repvgg_with_dead_channels(trained_digits_model, digits):
    train_ds, _ = digits
    model = repq.reparameterize(trained_digits_model)
    with torch.no_grad():
        conv = model.stage1[0].rbr_reparam
        conv.weight[:2].zero_()
        conv.bias[:2] = -1.0                    # two channels that ReLU turns into zeros everywhere
    q = repq.quantize(model, train_ds.calibration_images(16, 0), repq.PTQConfig(num_samples=16))
    assert torch.isfinite(q(train_ds.calibration_images(8, 1))).all()


def test_bias_correction_matches_the_float_channel_means():
    """After correction, the quantized layer's per-channel output mean on the calibration images equals the float
    layer's (computed here directly), up to the integer bias grid; without it, 4-bit weights shift the means."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(3.0)
        conv.bias.zero_()
    images = torch.rand(16, 3, 12, 12) + 0.5     # a positive input: weight rounding shifts the mean
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 2)).eval()
    float_mean = conv(images).mean(dim=(0, 2, 3))
    cfg = dict(num_samples=16, weight="minmax", w_bits=3, a_bits=8, activation="minmax")
    with pytest.warns(UserWarning, match="no re-parameterizable block"):
        plain = repq.quantize(model, images, repq.PTQConfig(**cfg, bias_correction=False))
        corrected = repq.quantize(model, images, repq.PTQConfig(**cfg))          # the default
    plain_gap = (plain[0](images).mean(dim=(0, 2, 3)) - float_mean).abs().max()
    layer = corrected[0]
    gap = (layer(images).mean(dim=(0, 2, 3)) - float_mean).abs().max()
    step = float((layer.input_quantizer.scale * layer.weight_scale).max())
    assert plain_gap > 10 * step
    assert gap <= step / 2 + 1e-6
    assert set(corrected.repq_quant["bias_correction"]) == {"0", "4"}

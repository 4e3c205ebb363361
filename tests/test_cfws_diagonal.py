"""CFWS on 1x1 kernels that carry a merged identity (MobileOne's pointwise blocks): the diagonal split against a
numpy re-implementation, the identity signature on real merged blocks, the depthwise coarse conv against an
integer computation, and ONNX Runtime parity of both deploy forms."""
import numpy as np
import pytest
import torch
from torch import nn

import repq
from repq.models.mobileone import MobileOneBlock
from repq.quant.modules import QuantConv2d
from repq.quant.weights import carries_identity, quantize_minmax, quantize_weight
from repq.reparam import reparameterize
from tests.conftest import tiny


def numpy_diagonal_cfws(w: np.ndarray, groups: int, qmax: int) -> np.ndarray:
    """Split the identity positions [o, o mod (I/g)] of a 1x1 kernel, written independently in float64."""
    w = w.astype(np.float64)[:, :, 0, 0]
    out_ch, per_group = w.shape
    rows, cols = np.arange(out_ch), np.arange(out_ch) % per_group
    diag = w[rows, cols]
    s_c = np.where(np.abs(diag) > 0, np.abs(diag) / qmax, 1.0)
    coarse = np.clip(np.floor(diag / s_c + 0.5), -qmax, qmax) * s_c
    fine_in = w.copy()
    fine_in[rows, cols] = diag - coarse
    amax = np.abs(fine_in).max(axis=1)
    s_f = np.where(amax > 0, amax / qmax, 1.0)
    out = np.clip(np.round(fine_in / s_f[:, None]), -qmax, qmax) * s_f[:, None]
    out[rows, cols] += coarse
    return out[:, :, None, None]


def identity_heavy(channels=16, groups=1, seed=0, spike=2.0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(channels, channels // groups, 1, 1, generator=gen) * 0.05
    o = torch.arange(channels)
    w[o, o % (channels // groups)] += spike * (0.5 + torch.rand(channels, 1, 1, generator=gen))
    return w


@pytest.mark.parametrize("groups,bits", [(1, 4), (1, 8), (4, 4)])
def test_diagonal_split_matches_numpy_and_beats_minmax(groups, bits):
    w = identity_heavy(16, groups, seed=groups + bits)
    q = quantize_weight(w, "cfws", bits, groups=groups)
    assert q.coarse_layout == "diagonal" and q.coarse_codes.shape == (16, 1, 1, 1)
    ref = numpy_diagonal_cfws(w.numpy(), groups, 2 ** (bits - 1) - 1)
    assert np.allclose(q.dequantize().double().numpy(), ref, atol=1e-6)
    err = float(((q.dequantize() - w) ** 2).mean())
    assert err * 10 < float(((quantize_minmax(w, bits).dequantize() - w) ** 2).mean())


@torch.no_grad()
def trained_looking(model: nn.Module) -> nn.Module:
    """BN scales around 1 and small conv weights, as after training: a merged identity then dominates the diagonal."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
        if isinstance(m, nn.Conv2d):
            m.weight.mul_(0.1)
    return model


def test_identity_signature_on_merged_blocks_and_not_elsewhere():
    torch.manual_seed(0)
    block = MobileOneBlock(16, 16, kernel_size=1, stride=1, groups=1, branches=2).eval()
    trained_looking(block)
    fused = reparameterize(nn.Sequential(block)).modules()
    conv = next(m for m in fused if isinstance(m, nn.Conv2d))
    assert carries_identity(conv.weight.detach(), conv.groups)
    gen = torch.Generator().manual_seed(1)
    assert not carries_identity(torch.randn(64, 64, 1, 1, generator=gen))        # a plain 1x1 conv
    assert not carries_identity(identity_heavy(16, 1).expand(16, 16, 1, 1)[:8])   # not square
    assert not carries_identity(torch.randn(16, 1, 1, 1, generator=gen), groups=16)   # depthwise 1x1: no split
    assert not carries_identity(torch.randn(8, 8, 3, 3, generator=gen))            # 3x3: the center rule applies
    plain = quantize_weight(torch.randn(32, 32, 1, 1, generator=gen), "cfws", 4)
    assert plain.coarse_codes is None


def pointwise_net():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                          nn.Conv2d(16, 16, 1, groups=4), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()
    with torch.no_grad():
        model[2].weight.copy_(identity_heavy(16, 1, seed=5))
        model[4].weight.copy_(identity_heavy(16, 4, seed=6))
    return model


@pytest.mark.parametrize("deploy", ["exact", "two_branch"])
@torch.no_grad()
def test_diagonal_layers_simulate_integers_and_run_in_onnx_runtime(deploy, tmp_path):
    pytest.importorskip("onnxruntime")
    from repq.export import export_onnx, run_onnx
    model = pointwise_net()
    images = torch.randn(16, 3, 10, 10)
    with pytest.warns(UserWarning, match="no re-parameterizable block"):
        q = repq.quantize(model, images, repq.PTQConfig(cfws_deploy=deploy, num_samples=16, w_bits=8,
                                                            one_conv_fallback=False))
    layers = [q[2], q[4]]
    assert all(isinstance(m, QuantConv2d) and m.coarse == "diagonal" for m in layers)
    assert q.repq_quant["layers"]["2"]["coarse"] == "diagonal"
    layer = q[2]
    x = torch.relu(q[0](images))
    codes = torch.round(layer.input_quantizer(x) / layer.input_quantizer.scale).numpy().astype(np.int64)
    _, coarse = layer.branch_accumulators(x)
    # the coarse conv multiplies each input channel by its own code: an int64 per-channel product
    expected = codes * layer.coarse_codes.numpy().astype(np.int64).reshape(1, -1, 1, 1)
    assert np.array_equal(coarse.numpy().astype(np.int64), expected)
    sim = q(images).numpy()
    assert np.abs(sim - model(images).numpy()).max() < 0.1 * np.abs(model(images).numpy()).max()
    path = export_onnx(q, tmp_path / "q.onnx", images[:1])
    ort = run_onnx(path, images.numpy())
    assert np.abs(ort - sim).max() <= 1e-5 * np.abs(sim).max() + 1e-6


@torch.no_grad()
def test_mobileone_pointwise_layers_get_the_diagonal_split_and_round_trip(tmp_path):
    model = tiny("mobileone_s0", width_scale=0.25)
    trained_looking(model)
    images = torch.randn(8, 1, 16, 16)
    q = repq.quantize(model, images, repq.PTQConfig(num_samples=8, w_bits=4))
    layouts = [m.coarse for m in q.modules() if isinstance(m, QuantConv2d)]
    assert "diagonal" in layouts and "center" in layouts
    repq.save_checkpoint(tmp_path / "q.pt", q)
    loaded, _ = repq.load_checkpoint(tmp_path / "q.pt")
    assert [m.coarse for m in loaded.modules() if isinstance(m, QuantConv2d)] == layouts
    assert torch.equal(loaded(images), q(images))

"""CFWS deployed as two fused integer convs (PTQConfig.cfws_deploy="two_branch"): the simulation equals an
independent integer computation (int64 accumulators, float32 requantization with round-half-even, int8
saturation), ONNX Runtime runs every CFWS conv as a fused QLinearConv (no ConvInteger, no float Conv) and
reproduces the simulation."""
import numpy as np
import pytest
import torch
from torch import nn

import repq

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from repq.export import export_onnx, integer_kernels, run_onnx  # noqa: E402


def conv_int64(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Direct convolution of integer arrays in int64 (N, C, H, W) x (O, C, k, k), groups 1."""
    n, c, h, wd = x.shape
    o, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((n, o, oh, ow), dtype=np.int64)
    for dy in range(k):
        for dx in range(k):
            patch = xp[:, :, dy:dy + stride * oh:stride, dx:dx + stride * ow:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, dy, dx])
    return out


def requantize(acc: np.ndarray, multiplier: np.ndarray) -> np.ndarray:
    """int32 accumulator -> int8: float32(acc) x float32 multiplier, round half to even, saturate."""
    y = np.rint(acc.astype(np.float32) * multiplier.reshape(1, -1, 1, 1).astype(np.float32))
    return np.clip(y, -128, 127)


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    with torch.no_grad():   # merged-RepVGG-like kernels: a large center tap on each channel
        for conv in (model[0], model[2], model[4]):
            conv.weight[:, :, 1, 1] += 3 * torch.randn(conv.weight.shape[:2]).abs()
    images = torch.randn(24, 3, 12, 12)
    with pytest.warns(UserWarning, match="no re-parameterizable block"):
        q = repq.quantize(model, images, repq.PTQConfig(cfws_deploy="two_branch", activation="minmax",
                                                        bias_correction=False, num_samples=24,
                                                        one_conv_fallback=False))
    return model, q, images


def test_two_branch_equals_an_independent_integer_computation(quantized):
    _, q, images = quantized
    layer = q[2]
    assert layer.two_branch and layer.coarse == "center" and bool((layer.branch_scales > 0).all())
    x = torch.relu(q[0](images))                      # what the layer receives
    s_x = np.float32(layer.input_quantizer.scale)
    lo, hi = float(layer.input_quantizer.qmin), float(layer.input_quantizer.qmax)
    codes = np.clip(np.rint(x.detach().numpy() / s_x), lo, hi).astype(np.int64)
    w_fine = layer.weight_codes.numpy().astype(np.int64)
    w_coarse = layer.coarse_codes.numpy().astype(np.int64)
    s_w, s_c = layer.weight_scale.numpy().astype(np.float32), layer.coarse_scale.numpy().astype(np.float32)
    s_fo, s_co = (np.float32(v) for v in layer.branch_scales.numpy())
    bias = np.rint(layer.bias.detach().numpy() / (s_x * s_w)).astype(np.int64)
    acc_fine = conv_int64(codes, w_fine, stride=2, pad=1) + bias.reshape(1, -1, 1, 1)
    acc_coarse = conv_int64(codes, w_coarse, stride=2, pad=0)
    assert np.abs(acc_fine).max() < 2 ** 31 and w_fine.max() <= 127 and w_coarse.max() <= 127
    y_fine = requantize(acc_fine, (s_x * s_w) / s_fo)
    y_coarse = requantize(acc_coarse, (s_x * s_c) / s_co)
    expected = y_fine * s_fo + y_coarse * s_co
    with torch.no_grad():
        got = layer(x).numpy()
    assert np.array_equal(got, expected.astype(np.float32))


def test_onnx_runtime_fuses_every_cfws_conv_and_reproduces_the_simulation(quantized, tmp_path):
    model, q, images = quantized
    path = export_onnx(q, tmp_path / "q.onnx", images[:1])
    kernels = integer_kernels(path)
    assert kernels.get("QLinearConv", 0) == 6 and not kernels.get("ConvInteger") and not kernels.get("Conv")
    assert kernels.get("QLinearAdd", 0) == 2   # the two adds whose sum the next conv requantizes (ReLU absorbed)
    # saturation check: inputs at the top of the input range fill every product of the u8 x s8 kernels
    extreme = torch.cat([images, torch.full((2, 3, 12, 12), 50.0), -torch.full((2, 3, 12, 12), 50.0)])
    with torch.no_grad():
        sim = q(extreme).numpy()
    ort = run_onnx(path, extreme.numpy())
    scale = np.abs(sim).max()
    per_image = np.abs(ort - sim).reshape(len(sim), -1).max(1) / scale
    assert (per_image < 1e-5).mean() >= 0.9, np.sort(per_image)[-5:]
    assert per_image[-4:].max() < 1e-5          # no saturation on the extreme inputs
    with torch.no_grad():                         # and the two-branch model stays close to the float model
        assert (q(images) - model(images)).abs().max() / model(images).abs().max() < 0.1


def test_two_branch_checkpoint_round_trip_and_cli(quantized, trained_digits_model, digits, tmp_path, capsys):
    import json
    from repq.cli import main
    train_ds, test_ds = digits
    q = repq.quantize(trained_digits_model, train_ds, repq.PTQConfig(cfws_deploy="two_branch"))
    repq.save_checkpoint(tmp_path / "q.pt", q)
    loaded, payload = repq.load_checkpoint(tmp_path / "q.pt")
    assert any(spec.get("two_branch") for spec in payload["quant"]["layers"].values())
    x = test_ds.head(64)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    repq.save_checkpoint(tmp_path / "fp.pt", trained_digits_model)
    assert main(["ptq", "--checkpoint", str(tmp_path / "fp.pt"), "--data", "digits", "--cfws-deploy", "two-branch",
                 "--quantize-pool", "--out", str(tmp_path / "q2.pt"), "--json"]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "q2.pt"), "--onnx", str(tmp_path / "q2.onnx"), "--data",
                 "digits", "--verify", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["verify"]["passed"] and not result["kernels"].get("ConvInteger")
    with pytest.raises(repq.RepqError, match="deploys CFWS layers"):
        repq.PTQConfig(weight="minmax", cfws_deploy="two_branch").validate()


def test_residual_layout_for_tensorrt_style_runtimes(quantized, tmp_path):
    """cfws_deploy="residual": the coarse conv's int8 output enters the fine conv's sum as its residual input;
    checked structurally on the ONNX graph and run in ONNX Runtime against the simulation."""
    model, _, images = quantized
    with pytest.warns(UserWarning, match="no re-parameterizable block"):
        q = repq.quantize(model, images, repq.PTQConfig(cfws_deploy="residual", activation="minmax",
                                                        bias_correction=False, num_samples=24,
                                                        one_conv_fallback=False))
    path = export_onnx(q, tmp_path / "residual.onnx", images[:1])
    graph = onnx.load(str(path)).graph
    producer = {out: n for n in graph.node for out in n.output}
    adds = [n for n in graph.node if n.op_type == "Add" and n.name.split("_add")[0] in ("0", "2", "4")]
    assert len(adds) == 3
    for add in adds:
        fine, residual = (producer[i] for i in add.input)
        assert fine.op_type == "Conv" and producer[fine.input[1]].op_type == "DequantizeLinear"   # int8 weights
        assert residual.op_type == "DequantizeLinear"
        q_node = producer[residual.input[0]]
        assert q_node.op_type == "QuantizeLinear" and producer[q_node.input[0]].op_type == "Conv"
    with torch.no_grad():
        sim = q(images).numpy()
    ort = run_onnx(path, images.numpy())
    assert np.abs(ort - sim).max() / np.abs(sim).max() < 1e-4
    with torch.no_grad():
        layer_out = q[0](images)
        fine_exact, coarse = q[0].branch_accumulators(images)
    s_x = q[0].input_quantizer.scale.double()
    expected = (fine_exact * (s_x * q[0].weight_scale.double()).reshape(1, -1, 1, 1)).float()
    assert torch.allclose(layer_out - expected, (layer_out - expected).div(q[0].branch_scales[1]).round()
                          * q[0].branch_scales[1], atol=1e-5)   # what is added is a whole number of int8 steps


def _one_layer(in_channels: int, identity: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU()).eval()
    if identity:   # a merged identity branch: a center tap 10x the largest other weight on each channel's own input
        with torch.no_grad():
            model[0].weight[:, :, 1, 1] += 10 * model[0].weight.abs().max() * torch.eye(16, in_channels)
    return model


@pytest.mark.parametrize("in_channels,identity,expected", [(16, True, "two_branch"), (3, False, "single_conv")])
def test_one_conv_fallback_keeps_the_form_that_reconstructs_the_layer_better(in_channels, identity, expected):
    """Per layer, the deployed form is whichever of two branches and one per-channel min-max conv puts the output
    after the ReLU closer to the float weights' on the same quantized input. Both forms are built here on their
    own (every layer two-branch; plain min-max weights) and their errors measured independently; the planted
    layers make each form win once (a merged identity: CFWS pays; 27 weights per filter without one: it does not)."""
    model = _one_layer(in_channels, identity)
    images = torch.randn(24, in_channels, 8, 8).relu()
    common = dict(activation="minmax", bias_correction=False, equalize=False, num_samples=24)
    with pytest.warns(UserWarning, match="no re-parameterizable block"):
        chosen = repq.quantize(model, images, repq.PTQConfig(cfws_deploy="two_branch", **common))
        branches = repq.quantize(model, images, repq.PTQConfig(cfws_deploy="two_branch", one_conv_fallback=False,
                                                               **common))
        one_conv = repq.quantize(model, images, repq.PTQConfig(weight="minmax", **common))
    q = chosen[0].input_quantizer
    assert float(q.scale) == float(one_conv[0].input_quantizer.scale) == float(branches[0].input_quantizer.scale)
    xq = torch.clamp(torch.round(images / q.scale), float(q.qmin), float(q.qmax)) * q.scale
    with torch.no_grad():
        target = torch.relu(torch.nn.functional.conv2d(xq, model[0].weight, model[0].bias, padding=1))
        errors = {"two_branch": float(((branches(images) - target) ** 2).mean()),
                  "single_conv": float(((one_conv(images) - target) ** 2).mean())}
        kept = min(errors, key=errors.get)
        assert kept == expected, errors
        record = chosen.repq_quant["layers"]["0"]
        assert record["branch_errors"]["deployed"] == kept
        assert record["branch_errors"]["two_branch_error"] == pytest.approx(errors["two_branch"], rel=1e-4)
        assert record["branch_errors"]["single_conv_error"] == pytest.approx(errors["single_conv"], rel=1e-4)
        assert torch.equal(chosen(images), (branches if kept == "two_branch" else one_conv)(images))
    assert chosen[0].two_branch == (kept == "two_branch") and record.get("two_branch", False) == chosen[0].two_branch
    assert (chosen[0].coarse is None) == (kept == "single_conv")
    check = chosen.repq_quant["two_branch_check"]
    assert check["one_conv_layers"] == (["0"] if kept == "single_conv" else [])
    assert check["two_branch_layers"] == (1 if kept == "two_branch" else 0)


def test_one_conv_fallback_layers_round_trip_and_run_in_onnx_runtime(tmp_path):
    """A network with layers of both forms: the checkpoint restores each layer's form bit-exactly, and ONNX Runtime
    runs the one-conv layers as plain QLinearConv (no coarse conv, no add) and reproduces the simulation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1)).eval()
    with torch.no_grad():   # a merged identity on the middle conv only
        model[2].weight[:, :, 1, 1] += 10 * model[2].weight.abs().max() * torch.eye(16)
    images = torch.randn(24, 3, 12, 12)
    with pytest.warns(UserWarning, match="no re-parameterizable block"):
        q = repq.quantize(model, images, repq.PTQConfig(cfws_deploy="two_branch", num_samples=24))
    forms = {n: spec["branch_errors"]["deployed"] for n, spec in q.repq_quant["layers"].items()
             if "branch_errors" in spec}
    assert forms["0"] == "single_conv" and forms["2"] == "two_branch", forms
    import copy
    import io

    from repq.ptq import restore_quantized
    buffer = io.BytesIO()   # what a checkpoint holds: the metadata and the state dict, loaded without pickled code
    torch.save({"meta": q.repq_quant, "state": q.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    loaded = restore_quantized(copy.deepcopy(model), saved["meta"])
    loaded.load_state_dict(saved["state"], strict=True)
    loaded.eval()
    assert loaded[0].coarse is None and not loaded[0].two_branch and loaded[2].two_branch
    with torch.no_grad():
        assert torch.equal(loaded(images), q(images))
    path = export_onnx(q, tmp_path / "q.onnx", images[:1])
    graph = onnx.load(str(path)).graph
    assert not any(n.name.startswith("0_coarse") for n in graph.node)
    assert any(n.name.startswith("2_coarse") for n in graph.node)
    kernels = integer_kernels(path)
    assert kernels.get("QLinearAdd", 0) == 1 and not kernels.get("Conv")
    with torch.no_grad():
        sim = q(images).numpy()
    ort = run_onnx(path, images.numpy())
    per_image = np.abs(ort - sim).reshape(len(sim), -1).max(1) / np.abs(sim).max()
    assert (per_image < 1e-5).mean() >= 0.9, np.sort(per_image)[-5:]   # a rare requantization tie may round apart

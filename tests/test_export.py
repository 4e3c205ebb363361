"""ONNX export: checker-valid QDQ graphs, integer kernels in ONNX Runtime, parity with the simulation."""
import numpy as np
import pytest
import torch
from torch import nn

import repq

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from repq.export import export_onnx, integer_kernels, run_onnx  # noqa: E402
from tests.conftest import randomize_bn, tiny  # noqa: E402

FLOAT_CONVS = ("Conv", "FusedConv", "NchwcConv")


def assert_parity(sim: np.ndarray, ort: np.ndarray, labels: np.ndarray) -> None:
    """ONNX Runtime computes the simulation's integer arithmetic, but its int32 accumulation and the simulation's
    float one can round a value sitting on a rounding boundary to neighbouring codes. That happens for a few images
    in a few hundred, and through RepVGG's large center taps one such flip can move that image's logits by several
    percent of the logit scale; so the bounds are on top-1 and on the share of images that differ, not on the
    single worst image."""
    top1_sim, top1_ort = (sim.argmax(1) == labels).mean() * 100, (ort.argmax(1) == labels).mean() * 100
    assert abs(top1_sim - top1_ort) <= 0.2 + 1e-9
    assert (ort.argmax(1) == sim.argmax(1)).mean() >= 0.99
    per_image = np.abs(ort - sim).max(axis=1) / np.abs(sim).max()
    assert (per_image < 1e-3).mean() >= 0.98, np.sort(per_image)[-10:]


def export_with_parity(q: nn.Module, tmp_path, calib: torch.Tensor, test_ds) -> tuple:
    """Export `q`, check the graph, assert parity with the simulation on the test split; return the ONNX path, ORT's
    optimized-graph op counts and the number of convs of `q`."""
    path = export_onnx(q, tmp_path / "q.onnx", calib[:1])
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    images = test_ds.normalize(test_ds.images)
    with torch.no_grad():
        sim = q(images).numpy()
    assert_parity(sim, run_onnx(path, images.numpy()), test_ds.labels.numpy())
    return path, integer_kernels(path), sum(isinstance(m, nn.Conv2d) for m in q.modules())


@pytest.fixture(scope="module")
def setup(trained_digits_model, digits):
    train_ds, test_ds = digits
    return trained_digits_model, train_ds.calibration_images(32, 0), test_ds


@pytest.mark.parametrize("weight", ["minmax", "cfws", "cfws_whole"])
@pytest.mark.parametrize("unsigned", [False, True])
def test_parity_and_integer_kernels(setup, tmp_path, weight, unsigned):
    model, calib, test_ds = setup
    q = repq.quantize(model, calib, repq.PTQConfig(weight=weight, activation="percentile",
                                                   unsigned_activations=unsigned, input_activation="minmax"))
    path, kernels, n_convs = export_with_parity(q, tmp_path, calib, test_ds)
    assert not any(kernels.get(op, 0) for op in FLOAT_CONVS), kernels
    per_conv = 2 if weight != "minmax" else 1   # CFWS: fine 3x3 + coarse 1x1 integer convs
    assert kernels.get("QLinearConv", 0) + kernels.get("ConvInteger", 0) == n_convs * per_conv
    assert kernels.get("QGemm", 0) == 1
    if unsigned and weight == "minmax":
        assert kernels.get("QLinearConv", 0) == n_convs - 1   # all but the last conv, whose output is not requantized
        # the signed image input of the (fused) first conv travels as uint8 with zero point 128
        graph = onnx.load(str(path)).graph
        assert graph.node[0].op_type == "QuantizeLinear"
        zero = next(i for i in graph.initializer if i.name == graph.node[0].input[2])
        assert zero.data_type == onnx.TensorProto.UINT8 and onnx.numpy_helper.to_array(zero) == 128


@pytest.mark.parametrize("deploy", ["exact", "two_branch"])
def test_default_recipe_exports_with_parity(setup, tmp_path, deploy):
    """repq's default (affine input grid, activation equalization, CFWS + auto + bias correction): the image enters
    as uint8 codes with the input quantizer's own zero point, every conv is an integer kernel, ORT agrees."""
    model, calib, test_ds = setup
    q = repq.quantize(model, calib, repq.PTQConfig(quantize_pool=True, cfws_deploy=deploy))
    assert q.repq_quant["equalization"]["pairs"]
    first = q.get_submodule("stage0.rbr_reparam").input_quantizer
    assert first.affine and not first.signed
    path, kernels, n_convs = export_with_parity(q, tmp_path, calib, test_ds)
    assert not any(kernels.get(op, 0) for op in FLOAT_CONVS), kernels
    graph = onnx.load(str(path)).graph
    assert graph.node[0].op_type == "QuantizeLinear"
    zero = next(i for i in graph.initializer if i.name == graph.node[0].input[2])
    assert zero.data_type == onnx.TensorProto.UINT8 and onnx.numpy_helper.to_array(zero) == int(first.zero_point)


@pytest.mark.parametrize("unsigned", [False, True])
def test_quantized_pool_makes_every_conv_a_fused_integer_kernel(setup, tmp_path, unsigned):
    model, calib, test_ds = setup
    q = repq.quantize(model, calib, repq.PTQConfig(weight="minmax", activation="percentile", quantize_pool=True,
                                                   unsigned_activations=unsigned))
    _, kernels, n_convs = export_with_parity(q, tmp_path, calib, test_ds)
    assert not any(kernels.get(op, 0) for op in FLOAT_CONVS), kernels
    if unsigned:
        assert kernels.get("QLinearConv", 0) == n_convs and "ConvInteger" not in kernels, kernels
    else:  # signed codes after a ReLU: ORT cannot fold the ReLU into a zero point 128 Q, so they stay ConvInteger
        assert kernels.get("ConvInteger", 0) + kernels.get("QLinearConv", 0) == n_convs, kernels


def test_cfws_graph_is_a_3x3_plus_a_1x1_integer_conv(setup, tmp_path):
    model, calib, _ = setup
    q = repq.quantize(model, calib, repq.PTQConfig(weight="cfws", activation="minmax"))
    graph = onnx.load(str(export_onnx(q, tmp_path / "c.onnx", calib[:1]))).graph
    shapes = sorted(tuple(a.ints) for n in graph.node if n.op_type == "ConvInteger"
                    for a in n.attribute if a.name == "kernel_shape")
    n_convs = sum(isinstance(m, nn.Conv2d) for m in q.modules())
    assert shapes.count((1, 1)) == n_convs and shapes.count((3, 3)) == n_convs


def test_float_export_and_refusals(tmp_path):
    model = randomize_bn(tiny())
    fused = repq.reparameterize(model)
    x = torch.randn(3, 1, 16, 16)
    with pytest.raises(repq.RepqError, match="not quantized"):
        export_onnx(fused, tmp_path / "f.onnx", x[:1])
    path = export_onnx(fused, tmp_path / "f.onnx", x[:1], allow_float=True)
    assert np.abs(run_onnx(path, x.numpy()) - fused(x).detach().numpy()).max() < 1e-4
    q16 = repq.quantize(model, x, repq.PTQConfig(w_bits=16, a_bits=16, num_samples=3))
    with pytest.raises(repq.RepqError, match="bits"):
        export_onnx(q16, tmp_path / "q16.onnx", x[:1])

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.norm = nn.GroupNorm(1, 2)

        def forward(self, x):
            return self.norm(self.conv(x)).mean(dim=(2, 3))
    with pytest.raises(repq.RepqError):
        export_onnx(Odd(), tmp_path / "odd.onnx", x[:1], allow_float=True)
    assert not (tmp_path / "odd.onnx").exists()

    class FullFlatten(nn.Module):  # flatten() starts at dim 0: not ONNX Flatten(axis=1)
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x).flatten()
    with pytest.raises(repq.RepqError, match="does not support"):
        export_onnx(FullFlatten(), tmp_path / "flat.onnx", x[:1], allow_float=True)


def test_cli_export_verify(setup, tmp_path, capsys):
    import json

    from repq.cli import main
    model, calib, _ = setup
    q = repq.quantize(model, calib, repq.PTQConfig(weight="cfws", unsigned_activations=True))
    repq.save_checkpoint(tmp_path / "q.pt", q, data="digits")
    assert main(["export", "--checkpoint", str(tmp_path / "q.pt"), "--onnx", str(tmp_path / "q.onnx"),
                 "--verify", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["verify"]
    assert abs(result["top1_repq"] - result["top1_onnxruntime"]) <= 0.2 + 1e-9
    assert main(["export", "--checkpoint", str(tmp_path / "q.pt"), "--onnx", str(tmp_path / "q.pt")]) == 2
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "q.pt"), "--onnx", str(tmp_path / "b.onnx"), "--bench",
                 "--bench-seconds", "0.1"]) == 0
    out = capsys.readouterr().out   # a row per layer: its kernel and its time at batch 64
    assert "ms per batch of 64" in out and "stage0.rbr_reparam" in out and "ConvInteger" in out


@pytest.mark.parametrize("method", ["lsq", "cluster"])
def test_qat_models_export_with_parity(setup, tmp_path, method):
    """W4A4 QAT models: LSQ runs as fused integer convs (4-bit codes in int8 containers, clipped to their range
    after the QuantizeLinear; only the last conv, whose output feeds the float pool, stays a ConvInteger);
    ClusterQAT runs as float convs on the quantized input grid, its indices + codebook in a side file."""
    model, calib, test_ds = setup
    qmodel = repq.convert_qat(repq.prepare_qat(model, repq.QATConfig(method=method, w_bits=4, a_bits=4), calib))
    _, kernels, n_convs = export_with_parity(qmodel, tmp_path, calib, test_ds)
    side = tmp_path / "q.codebook.npz"
    if method == "lsq":
        assert kernels.get("QLinearConv", 0) == n_convs - 1 and kernels.get("ConvInteger", 0) == 1, kernels
        assert not any(kernels.get(op, 0) for op in FLOAT_CONVS) and not side.exists()
        return
    tables = np.load(side)  # plain arrays: no pickle needed
    layer = qmodel.get_submodule("stage2.0.rbr_reparam")
    indices = tables["stage2.0.rbr_reparam.indices"]
    assert indices.dtype == np.uint8 and int(indices.max()) < 16
    np.testing.assert_array_equal(tables["stage2.0.rbr_reparam.codebook"][indices],
                                  layer.effective_weight().detach().numpy())
    assert "LUT" in str(tables["note"])


@pytest.mark.parametrize("weight,pool,expected", [("minmax", True, "QLinearConv"), ("cfws", False, "ConvInteger")])
def test_bench_reports_kernels_per_layer_and_an_fp32_twin(setup, tmp_path, weight, pool, expected):
    from repq.export.bench import bench, float_twin
    model, calib, test_ds = setup
    q = repq.quantize(model, calib, repq.PTQConfig(weight=weight, activation="percentile", quantize_pool=pool,
                                                   bias_correction=False))
    path = export_onnx(q, tmp_path / "q.onnx", calib[:1])
    result = bench(q, path, calib[:1], batches=(8,), seconds=0.2)
    convs = [n for n, m in q.named_modules() if isinstance(m, nn.Conv2d)]
    assert {result["layers"][n] for n in convs} == {expected} and result["layers"]["linear"] == "QGemm"
    assert result["images_per_s"][8]["model"] > 0 and result["images_per_s"][8]["fp32"] > 0
    timed = result["layer_ms"]
    assert timed["batch"] == 8 and set(timed["layers"]) == {*result["layers"], "(other nodes)"}
    assert all(t > 0 for t in timed["layers"].values())   # every layer's nodes were found in the profile
    twin = float_twin(q)   # the FP32 reference: plain float layers computing with the dequantized weights
    assert not any(hasattr(m, "input_quantizer") for m in twin.modules())
    x = calib[:4]
    with torch.no_grad():   # the simulation with its activation quantizers off computes the same float network
        for m in q.modules():
            if hasattr(m, "input_quantizer"):
                m.input_quantizer.mode = "off"
        reference = q(x)
    assert torch.allclose(twin(x), reference, atol=1e-5)

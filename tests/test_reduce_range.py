"""PTQConfig.reduce_range: 7-bit weight codes that ONNX Runtime's default u8 x s8 kernels multiply exactly on every
x64 CPU (without VNNI they add pairs of products in int16), and how repq reports the codes a model has."""
import numpy as np
import pytest
import torch
from torch import nn

import repq
from repq.errors import RepqError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from repq.export import export_onnx  # noqa: E402
from repq.export.verify import U8S8_EXACT_LIMIT, OnnxRuntimeModel, largest_weight_code  # noqa: E402
from repq.quant.modules import QUANT_LAYERS  # noqa: E402
from tests.test_export import assert_parity  # noqa: E402


@pytest.fixture(scope="module")
def setup(trained_digits_model, digits):
    train_ds, test_ds = digits
    return trained_digits_model, train_ds.calibration_images(32, 0), test_ds


def int8_initializers(path) -> np.ndarray:
    """Every int8 initializer of the graph, flattened: weight codes and int8 zero points (all zero)."""
    graph = onnx.load(str(path)).graph
    arrays = [onnx.numpy_helper.to_array(i).astype(np.int32).ravel() for i in graph.initializer
              if i.data_type == onnx.TensorProto.INT8]
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int32)


def module_codes(q: nn.Module) -> dict[str, int]:
    """Largest |weight code| of each quantized layer, fine and coarse codes together."""
    out = {}
    for name, m in q.named_modules():
        if isinstance(m, QUANT_LAYERS) and getattr(m, "weight_codes", None) is not None:
            largest = int(m.weight_codes.abs().max())
            if getattr(m, "coarse_codes", None) is not None:
                largest = max(largest, int(m.coarse_codes.abs().max()))
            out[name] = largest
    return out


@pytest.mark.parametrize("deploy", ["exact", "two_branch"])
def test_reduce_range_keeps_every_weight_code_within_63(setup, tmp_path, deploy):
    model, calib, _ = setup
    config = repq.PTQConfig(quantize_pool=True, cfws_deploy=deploy)
    wide = repq.quantize(model, calib, config)
    narrow = repq.quantize(model, calib, repq.PTQConfig(quantize_pool=True, cfws_deploy=deploy, reduce_range=True))
    assert max(module_codes(wide).values()) == 127          # CFWS fills its codes to the 8-bit limit
    codes = module_codes(narrow)
    assert set(codes) == set(module_codes(wide)) and max(codes.values()) == 63
    wide_path = export_onnx(wide, tmp_path / "wide.onnx", calib[:1])
    narrow_path = export_onnx(narrow, tmp_path / "narrow.onnx", calib[:1])
    assert np.abs(int8_initializers(narrow_path)).max() == 63 == largest_weight_code(narrow_path)
    assert np.abs(int8_initializers(wide_path)).max() == 127 == largest_weight_code(wide_path)
    assert largest_weight_code(narrow_path) <= U8S8_EXACT_LIMIT < largest_weight_code(wide_path)


def test_reduce_range_caps_the_edge_layers_and_leaves_narrower_layers(setup):
    """W4A8: the inner layers keep their 4-bit codes, the 8-bit edge layers (first conv, classifier) get 7 bits."""
    model, calib, _ = setup
    q = repq.quantize(model, calib, repq.PTQConfig(w_bits=4, weight="minmax", reduce_range=True))
    codes = module_codes(q)
    edges = set(q.repq_quant["edges"]["input"]) | set(q.repq_quant["edges"]["output"])
    assert edges and all(codes[n] == 63 for n in edges)
    assert all(c == 7 for n, c in codes.items() if n not in edges)


def test_reduce_range_model_is_exact_without_the_session_option(setup, tmp_path):
    """With every code within +-63 no u8 x s8 pair of products leaves int16, so ONNX Runtime's default kernels and
    its exact (u8 x u8) ones give the same outputs, on a CPU without VNNI as on one with it; both match the
    simulation."""
    model, calib, test_ds = setup
    q = repq.quantize(model, calib, repq.PTQConfig(quantize_pool=True, cfws_deploy="two_branch", reduce_range=True))
    path = export_onnx(q, tmp_path / "q.onnx", calib[:1])
    images = test_ds.normalize(test_ds.images)
    fast = OnnxRuntimeModel(path, exact_u8s8=False)(images).numpy()
    exact = OnnxRuntimeModel(path, exact_u8s8=True)(images).numpy()
    np.testing.assert_array_equal(fast, exact)
    with torch.no_grad():
        sim = q(images).numpy()
    assert_parity(sim, fast, test_ds.labels.numpy())


def test_reduce_range_refusals(setup, tmp_path, capsys):
    model, calib, _ = setup
    with pytest.raises(RepqError, match="reduce_range"):
        repq.quantize(model, calib, repq.PTQConfig(w_bits=16, reduce_range=True))
    from repq.cli import main
    repq.save_checkpoint(tmp_path / "fp.pt", model, data="digits")
    code = main(["ptq", "--checkpoint", str(tmp_path / "fp.pt"), "--data", "digits", "--w-bits", "16",
                 "--reduce-range"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --reduce-range: " in err and len(err.strip().splitlines()) == 1


def test_cli_ptq_and_export_report_the_weight_range(setup, tmp_path, capsys):
    from repq.cli import main
    model, _, _ = setup
    repq.save_checkpoint(tmp_path / "fp.pt", model, data="digits")
    assert main(["ptq", "--checkpoint", str(tmp_path / "fp.pt"), "--data", "digits", "--reduce-range",
                 "--out", str(tmp_path / "q.pt")]) == 0
    assert "weights <= 7 bits" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(tmp_path / "q.pt"), "--onnx", str(tmp_path / "q.onnx")]) == 0
    assert "stay within +-63" in capsys.readouterr().out
    assert main(["ptq", "--checkpoint", str(tmp_path / "fp.pt"), "--data", "digits", "--out",
                 str(tmp_path / "w.pt")]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "w.pt"), "--onnx", str(tmp_path / "w.onnx")]) == 0
    out = capsys.readouterr().out
    assert "reach +-127" in out and "session.x64quantprecision=1" in out and "--reduce-range" in out


# ---------------------------------------------------------------- QATConfig.reduce_range
def _train_briefly(qat, train_ds):
    repq.train(qat, train_ds, repq.TrainConfig(epochs=1, lr=0.01, weight_decay=0.0, max_steps_per_epoch=4),
               progress=False)   # codebook refits and LSQ step updates happen: the range must survive them


@pytest.mark.parametrize("method", ["lsq", "cluster"])
def test_qat_reduce_range_keeps_trained_codes_within_63_and_is_exact_in_the_default_kernels(
        trained_digits_model, digits, tmp_path, method):
    """QAT with reduce_range: after training and conversion every integer layer (edges at 8 -> 7 bits included)
    has codes within +-63, read back from the ONNX initializers with onnx; ONNX Runtime's default and exact kernels
    then agree bit for bit, and both match the converted model. Without it the same recipe reaches beyond 64."""
    train_ds, test_ds = digits
    extra = {"codebook_grid": "int8", "refit_every": 2} if method == "cluster" else {}
    config = dict(method=method, w_bits=8 if method == "lsq" else 4, a_bits=8, quantize_pool=True, **extra)
    x = test_ds.normalize(test_ds.images)
    paths = {}
    for reduce in (False, True):
        torch.manual_seed(0)
        qat = repq.prepare_qat(trained_digits_model, repq.QATConfig(reduce_range=reduce, **config), train_ds)
        _train_briefly(qat, train_ds)
        q = repq.convert_qat(qat)
        codes = module_codes(q)
        edges = set(q.repq_quant["edges"]["input"]) | set(q.repq_quant["edges"]["output"])
        assert edges and set(codes) >= edges
        paths[reduce] = export_onnx(q, tmp_path / f"{method}_{reduce}.onnx", x[:1])
        stored = int(np.abs(int8_initializers(paths[reduce])).max())
        if not reduce:
            assert stored > U8S8_EXACT_LIMIT
            continue
        assert max(codes.values()) <= 63 and stored <= 63 and largest_weight_code(paths[reduce]) == stored
        assert all(q.repq_quant["layers"][n]["w_bits"] <= 7 for n in codes)
        fast = OnnxRuntimeModel(paths[reduce], exact_u8s8=False)(x).numpy()
        exact = OnnxRuntimeModel(paths[reduce], exact_u8s8=True)(x).numpy()
        np.testing.assert_array_equal(fast, exact)
        with torch.no_grad():
            sim = q(x).numpy()
        assert_parity(sim, fast, test_ds.labels.numpy())


def test_qat_reduce_range_codebook_lies_on_the_63_grid(trained_digits_model, digits):
    from repq.quant.qat_modules import CodebookQuantizer, snap_to_int8_grid
    c = torch.tensor([-0.31, -0.02, 0.0049, 0.5])
    step = 0.5 / 63   # independent: the grid of max |centroid| / 63
    assert torch.allclose(snap_to_int8_grid(c, 63), torch.round(c / step) * step)
    train_ds, _ = digits
    qat = repq.prepare_qat(trained_digits_model, repq.QATConfig(method="cluster", w_bits=4, a_bits=8,
                                                                codebook_grid="int8", reduce_range=True), train_ds)
    _train_briefly(qat, train_ds)
    books = [m for m in qat.modules() if isinstance(m, CodebookQuantizer)]
    assert books and all(b.grid_max == 63 for b in books)
    for b in books:
        units = b.codebook / (b.codebook.abs().max() / 63)
        assert torch.allclose(units, units.round(), atol=1e-4) and units.abs().max() <= 63 + 1e-4
    assert max(b.codebook.numel() for b in books) == 2 ** 7      # the 8-bit edge layers: 7-bit indices


def test_qat_reduce_range_refusals_and_cli(trained_digits_model, tmp_path, capsys):
    from repq.cli import main
    with pytest.raises(RepqError, match="codebook_grid='int8'"):
        repq.QATConfig(method="cluster", reduce_range=True).validate()
    repq.save_checkpoint(tmp_path / "fp.pt", trained_digits_model, data="digits")
    base = ["qat", "--checkpoint", str(tmp_path / "fp.pt"), "--data", "digits", "--epochs", "1", "--max-steps", "2"]
    assert main(base + ["--reduce-range", "--out", str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert "--reduce-range" in err and "--codebook-grid int8" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.pt").exists()
    assert main(base + ["--method", "lsq", "--w-bits", "8", "--a-bits", "8", "--reduce-range",
                        "--out", str(tmp_path / "r.pt")]) == 0
    assert "QAT lsq W8A8, weights <= 7 bits" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(tmp_path / "r.pt"), "--onnx", str(tmp_path / "r.onnx")]) == 0
    assert "stay within +-63" in capsys.readouterr().out
    assert main(base + ["--method", "lsq", "--w-bits", "8", "--a-bits", "8", "--json",
                        "--out", str(tmp_path / "w.pt")]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "w.pt"), "--onnx", str(tmp_path / "w.onnx")]) == 0
    assert "`repq qat --reduce-range`" in capsys.readouterr().out

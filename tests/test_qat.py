"""Quantization-aware training (methods.md section 5): k-means codebooks, LSQ gradients, ClusterQAT and LSQ layers,
conversion to deploy layers, the `repq qat` command (one process and torchrun)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import repq
from repq.cli import main
from repq.quant.codebook import assign, kmeans_1d, lloyd_steps
from repq.quant.modules import CodebookConv2d, QuantConv2d
from repq.quant.qat_modules import QAT_LAYERS, CodebookQuantizer, lsq_fake_quantize
from tests.conftest import tiny


# ---------------------------------------------------------------- codebooks
def test_assign_is_the_nearest_centroid():
    gen = torch.Generator().manual_seed(0)
    values, centroids = torch.randn(500, generator=gen), torch.randn(7, generator=gen)  # unsorted on purpose
    brute = (values.reshape(-1, 1) - centroids.reshape(1, -1)).abs().argmin(dim=1)
    assert torch.equal(assign(values, centroids), brute)
    # A value exactly between two centroids goes to the lower one.
    assert assign(torch.tensor([0.5]), torch.tensor([1.0, 0.0])).item() == 1


def test_kmeans_recovers_the_centers_of_a_mixture():
    gen = torch.Generator().manual_seed(1)
    centers = torch.tensor([-3.0, -1.2, 0.4, 2.5])
    values = (centers.repeat_interleave(400) + 0.05 * torch.randn(1600, generator=gen))[torch.randperm(1600)]
    found = kmeans_1d(values, 4)
    torch.testing.assert_close(found, centers, atol=0.02, rtol=0)


def test_lloyd_step_is_the_mean_of_each_cluster_and_relocates_empty_centroids():
    values = torch.tensor([0.0, 0.2, 0.9, 1.1, 1.3])
    # Centroids 0.1 | 1.0 | 5.0: clusters {0, 0.2}, {0.9, 1.1, 1.3}, {}; the empty one moves to the median value.
    out = lloyd_steps(values, torch.tensor([0.1, 1.0, 5.0]), iters=1)
    torch.testing.assert_close(out, torch.tensor([0.1, 1.1, 0.9]))


def test_kmeans_uses_every_centroid_despite_an_outlier():
    """A fused kernel: a bulk of small taps and one huge identity tap. Linearly spaced starts would leave most
    centroids in the gap; relocation puts them back where the values are."""
    gen = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randn(5000, generator=gen) * 0.05, torch.tensor([900.0])])
    centroids = kmeans_1d(values, 16)
    counts = torch.bincount(assign(values, centroids), minlength=16)
    assert int((counts == 0).sum()) == 0
    error = (values - centroids[assign(values, centroids)]).pow(2).sum()
    assert 10 * torch.log10(values[:-1].pow(2).sum() / error) > 18  # Lloyd-Max for 15 levels: about 20 dB


# ---------------------------------------------------------------- LSQ
def test_lsq_step_gradient_matches_a_finite_difference():
    """LSQ's step gradient is that of round(v) treated as v + constant: check it against central differences of
    that surrogate, computed here with the rounding residual frozen at the evaluation point."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64) * 2
    upstream = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    s0, qmin, qmax, factor = 0.37, -4, 3, 0.5
    step = torch.tensor(s0, dtype=torch.float64, requires_grad=True)
    (lsq_fake_quantize(x, step, qmin, qmax, factor) * upstream).sum().backward()

    residual = torch.round(torch.clamp(x / s0, qmin, qmax)) - torch.clamp(x / s0, qmin, qmax)

    def surrogate(s: float) -> float:
        return float(((torch.clamp(x / s, qmin, qmax) + residual) * s * upstream).sum())

    h = 1e-6
    finite_difference = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    assert float(step.grad) == pytest.approx(factor * finite_difference, rel=1e-6)
    # The forward itself is the plain uniform quantizer.
    expected = torch.clamp(torch.round(x / s0), qmin, qmax) * s0
    torch.testing.assert_close(lsq_fake_quantize(x, step, qmin, qmax, factor), expected)


def test_lsq_input_gradient_is_straight_through_inside_the_range_only():
    x = torch.tensor([-10.0, -0.3, 0.0, 0.6, 10.0], requires_grad=True)
    lsq_fake_quantize(x, torch.tensor(0.25), -4, 3, 1.0).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def _silu_like(n: int = 4000, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.silu(torch.randn(n, generator=gen) * 2.0)


def test_affine_lsq_is_an_unsigned_grid_with_a_zero_point_and_lsq_plus_offset_gradient():
    """LSQ+ on a SiLU-like input: unsigned 4-bit codes, zero point round(-min / step), forward equal to numpy's
    (clip(round(x / s) + z, 0, 15) - z) * s; the offset's gradient is the gradient scale times the upstream
    gradient summed over the clipped values (inside the range the output does not depend on the offset)."""
    from repq.quant.qat_modules import LSQQuantizer
    x = _silu_like()
    q = LSQQuantizer(4, affine=True, init="minmax")
    q.init_from(x)
    s, z = float(q.current_step()), q.current_zero_point()
    assert (float(q.qmin), float(q.qmax)) == (0.0, 15.0) and q.affine
    assert s == pytest.approx((float(x.max()) - float(x.min())) / 15, rel=1e-6)
    assert z == round(-float(x.min()) / s) and z >= 1
    xn = x.double().numpy()
    expected = (np.clip(np.round(xn / s) + z, 0, 15) - z) * s
    np.testing.assert_allclose(q(x).detach().double().numpy(), expected, atol=1e-6)

    probe = torch.cat([x, torch.tensor([-3.0, 50.0])])   # one value below the grid, one above
    upstream = torch.randn(probe.shape, generator=torch.Generator().manual_seed(4))
    (q(probe) * upstream).sum().backward()
    codes = probe.double().numpy() / s + z
    clipped = torch.from_numpy((codes < 0) | (codes > 15))
    factor = 1.0 / (probe[0].numel() * 15) ** 0.5
    assert float(q.offset.grad) == pytest.approx(factor * float(upstream[clipped].sum()), rel=1e-5)


def test_affine_grid_halves_the_4_bit_error_of_a_silu_input_and_leaves_relu_inputs_alone():
    """Why LSQ+ for SiLU inputs: the symmetric signed grid spends half its codes below -0.28, where nothing lies.
    On a non-negative input the affine quantizer is the plain unsigned one (zero point 0)."""
    from repq.quant.qat_modules import LSQQuantizer
    x = _silu_like()
    errors = {}
    for affine in (False, True):
        q = LSQQuantizer(4, affine=affine, init="mse", allow_unsigned=True)
        q.init_from(x)
        errors[affine] = float((q(x) - x).pow(2).mean().detach())
    assert errors[True] < 0.5 * errors[False]
    relu = LSQQuantizer(4, affine=True, allow_unsigned=True)
    relu.init_from(torch.relu(x))
    assert not relu.affine and relu.current_zero_point() == 0 and float(relu.qmin) == 0


@pytest.mark.parametrize("method, grid", [("lsq", "free"), ("cluster", "int8"), ("cluster", "free")])
def test_affine_activations_train_convert_and_run_fused_in_onnx_runtime(method, grid, tmp_path):
    """A SiLU network: the SiLU-fed layers get zero points, the converted model equals the QAT model, and ONNX
    Runtime reproduces it: integer layers with the conv whose affine input feeds a ReLU -> quantized layer fused
    into a QLinearConv; free-codebook layers with the input clipped to the shifted range. (tests/test_detection.py
    covers the command line and the checkpoint.)"""
    pytest.importorskip("onnxruntime")
    from repq.export import export_onnx, integer_kernels, run_onnx
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 1))
    x = torch.randn(32, 3, 12, 12)
    target = model(x).detach()
    config = repq.QATConfig(method=method, w_bits=4, a_bits=4, edge_bits=None, affine_activations=True,
                            codebook_grid=grid)
    qat = repq.prepare_qat(model, config, x)
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    for _ in range(5):
        loss = (qat.train()(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    q = repq.convert_qat(qat.eval())
    zero_points = {n: spec.get("input_zero_point", 0) for n, spec in q.repq_quant["layers"].items()}
    assert zero_points["2"] > 0 and zero_points["4"] > 0 and zero_points["6"] == 0   # SiLU-fed; ReLU-fed
    layer = q.get_submodule("4").input_quantizer
    s, z = float(layer.scale), int(layer.zero_point)
    h = torch.nn.functional.silu(q[2](torch.nn.functional.silu(q[0](x))))
    codes = np.clip(np.round(h.detach().numpy() / s) + z, 0, 15)
    np.testing.assert_allclose(layer(h).detach().numpy(), (codes - z) * s, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(q(x), qat(x), atol=1e-5)
    path = export_onnx(q, tmp_path / "affine.onnx", x[:1])
    assert integer_kernels(path).get("QLinearConv", 0) >= (0 if (method, grid) == ("cluster", "free") else 1)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(path, x.numpy()), q(x).numpy(), atol=1e-4)


def test_checkpoints_without_activation_zero_points_still_load(trained_digits_model, digits, tmp_path):
    """Quantized checkpoints written before affine activations have no zero_point buffers: they read as 0."""
    train_ds, test_ds = digits
    q = repq.quantize(trained_digits_model, train_ds, repq.PTQConfig(activation="minmax", bias_correction=False,
                                                                     input_activation="minmax"))   # as back then
    repq.save_checkpoint(tmp_path / "q.pt", q)
    payload = torch.load(tmp_path / "q.pt", weights_only=True)
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.endswith("zero_point")}
    torch.save(payload, tmp_path / "old.pt")
    loaded = repq.load_checkpoint(tmp_path / "old.pt")[0]
    x = test_ds.head(64)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_lsq_weight_quantizer_is_per_channel_with_at_most_2b_minus_1_levels(trained_digits_model):
    qat = repq.prepare_qat(trained_digits_model, repq.QATConfig(method="lsq", w_bits=3, a_bits=3, edge_bits=None))
    layer = qat.get_submodule("stage2.1.rbr_reparam")
    w = layer.quantized_weight()
    step = layer.weight_quantizer.step.detach()
    assert step.shape == (w.shape[0],)
    for o in range(w.shape[0]):
        codes = w[o] / step[o]
        torch.testing.assert_close(codes, torch.round(codes), atol=1e-4, rtol=0)
        assert len(torch.unique(torch.round(codes))) <= 7 and float(codes.abs().max()) <= 3 + 1e-4


# ---------------------------------------------------------------- ClusterQAT layers
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cluster_layers_use_at_most_2b_distinct_weights(trained_digits_model, bits):
    qat = repq.prepare_qat(trained_digits_model, repq.QATConfig(method="cluster", w_bits=bits, a_bits=bits,
                                                                edge_bits=None))
    layers = [m for m in qat.modules() if isinstance(m, QAT_LAYERS)]
    assert layers
    for layer in layers:
        w = layer.quantized_weight()
        assert len(torch.unique(w)) <= 2 ** bits
        # Each weight is replaced by a nearest centroid (brute force; equal up to float rounding at near-ties).
        codebook = layer.weight_quantizer.codebook.detach()
        latent = layer.weight.detach().reshape(-1)
        assert bool(torch.isin(w.reshape(-1), codebook).all())
        best = (latent.reshape(-1, 1) - codebook).abs().amin(1)
        assert float(((latent - w.reshape(-1)).abs() - best).max()) <= 1e-7


def test_learned_codebook_gradient_is_the_mean_over_assigned_weights():
    torch.manual_seed(0)
    w = torch.randn(200, requires_grad=True)
    quantizer = CodebookQuantizer(w.detach(), bits=2, mode="learned")
    upstream = torch.randn(200)
    (quantizer(w) * upstream).sum().backward()
    idx = (w.detach().reshape(-1, 1) - quantizer.codebook.detach()).abs().argmin(1)
    expected = torch.zeros(4).index_add_(0, idx, upstream) / torch.bincount(idx, minlength=4).clamp_min(1)
    torch.testing.assert_close(quantizer.codebook.grad, expected)
    torch.testing.assert_close(w.grad, upstream)  # straight-through to the latent weights


def test_codebook_refit_happens_every_n_training_steps_only():
    torch.manual_seed(0)
    w = torch.randn(300)
    quantizer = CodebookQuantizer(w, bits=3, mode="refit", refit_every=2, lloyd_iters=2).train()
    start = quantizer.codebook.clone()
    shifted = w * 1.5 + 0.3  # the latent weights moved: a refit must move the centroids
    quantizer(shifted)       # step 0: no refit
    assert torch.equal(quantizer.codebook, start)
    quantizer(shifted)       # step 1
    quantizer(shifted)       # step 2: refit
    assert not torch.equal(quantizer.codebook, start)
    torch.testing.assert_close(quantizer.codebook, lloyd_steps(shifted, start, 2))
    frozen = CodebookQuantizer(w, bits=3, mode="refit", refit_every=0).train()
    before = frozen.codebook.clone()
    for _ in range(5):
        frozen(shifted)
    assert torch.equal(frozen.codebook, before)


@pytest.mark.parametrize("method, codebook", [("cluster", "refit"), ("cluster", "learned"), ("lsq", "refit")])
def test_a_few_qat_steps_lower_the_loss_and_convert_exactly(trained_digits_model, digits, method, codebook):
    train_ds, test_ds = digits
    config = repq.QATConfig(method=method, w_bits=3, a_bits=3, codebook=codebook, refit_every=5)
    qat = repq.prepare_qat(trained_digits_model, config, train_ds)
    x, y = next(iter(train_ds.batches(256, shuffle=True, seed=0)))
    criterion = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        before = float(criterion(qat.eval()(x), y))
    codebooks = {n: m.weight_quantizer.codebook.clone() for n, m in qat.named_modules()
                 if isinstance(m, QAT_LAYERS) and method == "cluster"}
    repq.train(qat, train_ds, repq.TrainConfig(epochs=1, batch_size=64, lr=0.01, weight_decay=0.0, seed=0,
                                               max_steps_per_epoch=12, augment=False), progress=False)
    with torch.no_grad():
        after = float(criterion(qat.eval()(x), y))
    assert after < before
    for name, start in codebooks.items():
        assert not torch.equal(qat.get_submodule(name).weight_quantizer.codebook, start), name
    qmodel = repq.convert_qat(qat)
    deploy = CodebookConv2d if method == "cluster" else QuantConv2d
    assert isinstance(qmodel.get_submodule("stage1.0.rbr_reparam"), deploy)
    xt = next(iter(test_ds.batches(128)))[0]
    with torch.no_grad():
        diff = (qmodel(xt) - qat(xt)).abs().max()
        assert float(diff) < 1e-4 * max(1.0, float(qat(xt).abs().max()))


def test_prepare_without_data_initializes_on_the_first_batch(trained_digits_model, digits):
    qat = repq.prepare_qat(trained_digits_model, repq.QATConfig(method="lsq", w_bits=4, a_bits=4))
    with pytest.raises(repq.RepqError, match="no activation step"):
        repq.convert_qat(qat)
    x = next(iter(digits[0].batches(64)))[0]
    qat.eval()(x)
    quantizers = [m.input_quantizer for m in qat.modules() if isinstance(m, QAT_LAYERS)]
    assert all(bool(q.initialized) for q in quantizers)
    # Post-ReLU inputs take unsigned codes (0..15); the normalized network input stays signed.
    assert quantizers[0].signed and not any(q.signed for q in quantizers[1:])
    repq.convert_qat(qat)


def test_edge_layers_keep_8_bits_by_default(trained_digits_model):
    qat = repq.prepare_qat(trained_digits_model, repq.QATConfig(method="cluster", w_bits=3, a_bits=3))
    layers = [m for m in qat.modules() if isinstance(m, QAT_LAYERS)]
    assert layers[0].weight_quantizer.codebook.numel() == 256 and layers[-1].weight_quantizer.codebook.numel() == 256
    assert all(m.weight_quantizer.codebook.numel() == 8 for m in layers[1:-1])


class TwoHeads(torch.nn.Module):
    """A stem, a shared trunk and two prediction heads whose outputs are concatenated (as a detector's class and
    box maps are): the output layers are both heads, found through cat, an in-place ReLU and a reshape."""

    def __init__(self):
        super().__init__()
        self.box = torch.nn.Conv2d(8, 4, 1)           # registered before the trunk: module order is not graph order
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.trunk = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.cls = torch.nn.Conv2d(8, 2, 1)
        self.unused_aux = torch.nn.Conv2d(8, 8, 1)     # runs, but its output reaches no network output

    def forward(self, x):
        y = torch.relu_(self.trunk(torch.relu(self.stem(x))))
        self.unused_aux(y)
        maps = torch.cat([self.box(y), torch.relu_(self.cls(y))], dim=1)
        return {"maps": maps.flatten(2), "stride": 8}


def test_edge_layers_follow_the_graph_not_the_module_order():
    from repq.quant.edges import edge_layers
    first, outputs = edge_layers(TwoHeads(), torch.randn(2, 3, 8, 8))
    assert first == ["stem"] and outputs == ["box", "cls"]
    seq = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))
    assert edge_layers(seq, torch.randn(1, 1, 8, 8)) == (["0"], ["3"])


def test_every_detector_prediction_conv_is_an_edge_layer():
    model = repq.create_model("yolov6_pico", num_classes=3)
    qat = repq.prepare_qat(model, repq.QATConfig(method="lsq", w_bits=4, a_bits=4, num_samples=4),
                           torch.randn(4, 3, 64, 64))
    eight = sorted(n for n, b in qat.repq_qat["bits"].items() if b == [8, 8])
    assert eight == sorted(["backbone.stem.rbr_reparam"] + [f"detect.{i}.{head}_pred" for i in range(3)
                                                            for head in ("reg", "cls")])
    assert sum(b == [4, 4] for b in qat.repq_qat["bits"].values()) == len(qat.repq_qat["bits"]) - 7


@pytest.mark.parametrize("options, message", [(dict(method="kmeans"), "unknown QAT method"),
                                              (dict(w_bits=1), "between 2 and 8"),
                                              (dict(codebook="fixed"), "codebook must be"),
                                              (dict(activation_init="max"), "activation_init")])
def test_bad_qat_config_is_a_one_line_error(options, message):
    with pytest.raises(repq.RepqError, match=message):
        repq.prepare_qat(tiny(), repq.QATConfig(**options))


def test_quantized_qat_checkpoint_round_trips(trained_digits_model, digits, tmp_path):
    train_ds, test_ds = digits
    qat = repq.prepare_qat(trained_digits_model, repq.QATConfig(method="cluster", w_bits=4, a_bits=4), train_ds)
    with pytest.raises(repq.RepqError, match="convert_qat"):
        repq.save_checkpoint(tmp_path / "qat.pt", qat)
    qmodel = repq.convert_qat(qat)
    repq.save_checkpoint(tmp_path / "q.pt", qmodel)
    loaded, payload = repq.load_checkpoint(tmp_path / "q.pt")
    assert payload["kind"] == "quantized" and payload["quant"]["qat"]["method"] == "cluster"
    layer = loaded.get_submodule("stage2.0.rbr_reparam")
    assert layer.weight_indices.dtype == torch.uint8 and layer.codebook.numel() == 16
    accuracy = [{k: repq.evaluate(m, test_ds)[k] for k in ("top1", "top5", "n")} for m in (loaded, qmodel)]
    assert accuracy[0] == accuracy[1]


# ---------------------------------------------------------------- command line
def test_cli_qat_writes_a_quantized_checkpoint(trained_digits_model, tmp_path, capsys):
    ckpt = tmp_path / "fp.pt"
    repq.save_checkpoint(ckpt, trained_digits_model)
    out = tmp_path / "w4a4.pt"
    code = main(["qat", "--checkpoint", str(ckpt), "--data", "digits", "--method", "lsq", "--epochs", "1",
                 "--max-steps", "3", "--out", str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and out.exists()
    assert set(result) >= {"fp", "start", "qat", "epochs"} and result["fp"]["top1"] > 80
    code = main(["eval", "--checkpoint", str(out), "--data", "digits", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["results"]["quantized"]["top1"] == result["qat"]["top1"]
    # The quantized output is not a valid QAT input, and an input is never overwritten.
    assert main(["qat", "--checkpoint", str(out), "--data", "digits", "--out", str(tmp_path / "x.pt")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["qat", "--checkpoint", str(ckpt), "--data", "digits", "--out", str(ckpt)]) == 2


def test_torchrun_two_process_qat_writes_one_checkpoint(trained_digits_model, tmp_path):
    ckpt = tmp_path / "fp.pt"
    repq.save_checkpoint(ckpt, trained_digits_model)
    out = tmp_path / "ddp_qat.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534", "-m",
           "repq.cli", "qat", "--checkpoint", str(ckpt), "--data", "digits", "--method", "cluster", "--epochs", "1",
           "--max-steps", "3", "--batch-size", "16", "--eval-limit", "64", "--out", str(out), "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ddp_qat.pt", "fp.pt"]
    payload = repq.checkpoint.read_checkpoint(out)
    assert len(payload["history"]["loss"]) == 3 and payload["quant"]["qat"]["method"] == "cluster"


@pytest.mark.parametrize("a_bits", [8, 4])
def test_int8_grid_codebook_snaps_trains_and_deploys_as_fused_int8(trained_digits_model, digits, tmp_path, capsys,
                                                                   a_bits):
    """codebook_grid="int8": every centroid is a multiple of one per-layer scale (max |centroid| / 127), the
    converted layers hold int8 codes with at most 2^b distinct values, and ONNX Runtime runs them as QLinearConv
    with the QAT model's accuracy (every conv, with the pool input quantized too). 4-bit activations too: their
    codes are clipped to 0..15 after the QuantizeLinear, which keeps each conv fused."""
    pytest.importorskip("onnxruntime")
    from repq.export import export_onnx, integer_kernels, run_onnx
    from repq.quant.qat_modules import snap_to_int8_grid
    c = torch.tensor([-0.31, -0.02, 0.0049, 0.5])
    scale = 0.5 / 127
    assert torch.allclose(snap_to_int8_grid(c), torch.round(c / scale) * scale) and snap_to_int8_grid(c)[-1] == 0.5
    train_ds, test_ds = digits
    qat = repq.prepare_qat(trained_digits_model, repq.QATConfig(method="cluster", w_bits=4, a_bits=a_bits,
                                                                codebook_grid="int8", quantize_pool=True), train_ds)
    repq.train(qat, train_ds, repq.TrainConfig(epochs=1, lr=0.01, weight_decay=0.0, max_steps_per_epoch=5),
               progress=False)   # refits happen during training too: the grid must survive them
    for m in qat.modules():
        if isinstance(m, CodebookQuantizer):
            grid = m.codebook / m.grid_scale()
            assert torch.allclose(grid, grid.round(), atol=1e-4)
    q = repq.convert_qat(qat)
    layer = q.get_submodule("stage2.0.rbr_reparam")
    assert isinstance(layer, QuantConv2d) and torch.unique(layer.weight_codes).numel() <= 16
    assert layer.weight_codes.abs().max() <= 127 and torch.unique(layer.weight_scale).numel() == 1
    x, y = test_ds.head(len(test_ds))
    with torch.no_grad():
        assert torch.allclose(q(x), qat.eval()(x), atol=1e-4)   # conversion keeps the trained model's outputs
    path = export_onnx(q, tmp_path / "grid.onnx", x[:1])
    kernels = integer_kernels(path)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in q.modules())
    assert kernels.get("QLinearConv", 0) == n_convs and not kernels.get("Conv") and not kernels.get("ConvInteger")
    ort = run_onnx(path, x.numpy())
    assert (torch.from_numpy(ort).argmax(1) == q(x).argmax(1)).float().mean() >= 0.99
    repq.save_checkpoint(tmp_path / "grid.pt", q)   # the quantized pool survives the round trip
    with torch.no_grad():
        assert torch.equal(repq.load_checkpoint(tmp_path / "grid.pt")[0](x), q(x))
    repq.save_checkpoint(tmp_path / "q.pt", trained_digits_model)
    assert main(["qat", "--checkpoint", str(tmp_path / "q.pt"), "--data", "digits", "--method", "lsq",
                 "--codebook-grid", "int8", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--codebook-grid applies to --method cluster only" in capsys.readouterr().err


# ---------------------------------------------------------------- per-channel codebook scale
def _channel_sqnr_db(w: np.ndarray, wq: np.ndarray) -> np.ndarray:
    w, wq = w.reshape(len(w), -1), wq.reshape(len(wq), -1)
    return 10 * np.log10((w ** 2).sum(1) / ((w - wq) ** 2).sum(1))


def test_channel_codebook_is_nearest_centroid_of_normalized_weights_times_each_channel_max():
    """scale="channel": each channel's weight is max|w_c| x the nearest centroid to w / max|w_c| (brute force in
    numpy), an all-zero channel stays zero (no division by zero), and the latent weights get the straight-through
    gradient. On a layer whose channels differ 1000x in range (as a fused identity branch makes them) every
    channel keeps > 15 dB of SQNR at 4 bits, where one codebook in weight units leaves the narrow channels with
    ~0 dB (almost every weight on one centroid)."""
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3) * torch.tensor([1e-3, 1e-3, 1e-3, 0.01, 0.1, 1.0, 1.0, 0.0]).reshape(-1, 1, 1, 1)
    w = w.requires_grad_()
    q = CodebookQuantizer(w.detach(), bits=4, scale="channel").train()
    out = q(w)
    wn = w.detach().numpy()
    amax = np.abs(wn.reshape(8, -1)).max(1)
    cb = q.codebook.numpy()
    normalized = wn / np.where(amax > 0, amax, 1.0).reshape(-1, 1, 1, 1)
    nearest = cb[np.abs(normalized[..., None] - cb).argmin(-1)]
    np.testing.assert_allclose(out.detach().numpy(), nearest * amax.reshape(-1, 1, 1, 1), rtol=1e-6, atol=1e-12)
    assert torch.isfinite(out).all() and bool((out[7] == 0).all())
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream)
    per_layer = CodebookQuantizer(w.detach(), bits=4, scale="layer").eval()(w.detach())
    live = slice(0, 7)
    assert _channel_sqnr_db(wn[live], out.detach().numpy()[live]).min() > 15
    assert _channel_sqnr_db(wn[live], per_layer.numpy()[live]).min() < 3


def test_channel_codebook_refits_in_normalized_units():
    torch.manual_seed(0)
    w = torch.randn(6, 20) * torch.logspace(-2, 0, 6).reshape(-1, 1)
    q = CodebookQuantizer(w, bits=3, scale="channel", refit_every=1, lloyd_iters=2).train()
    start = q.codebook.clone()
    moved = w + 0.3 * w.abs().amax(1, keepdim=True) * torch.rand_like(w)
    q(moved)   # step 0: no refit
    q(moved)   # step 1: refit on moved / max|moved_c|
    normalized = moved / moved.abs().amax(1, keepdim=True)
    torch.testing.assert_close(q.codebook, lloyd_steps(normalized, start, 2))


@pytest.mark.parametrize("grid", ["free", "int8"])
def test_channel_codebook_trains_converts_round_trips_and_exports(trained_digits_model, digits, tmp_path, grid):
    """The converted model equals the QAT model; free: indices + codebook + one scale per channel (also in the
    side file), exported as looked-up weights times that scale; int8: int8 codes whose per-channel scale is the
    grid step times the channel's max |w|, run by ONNX Runtime as QLinearConv. The checkpoint round-trips."""
    pytest.importorskip("onnxruntime")
    from repq.export import export_onnx, integer_kernels, run_onnx
    from repq.export.onnx_qdq import codebook_path
    train_ds, test_ds = digits
    config = repq.QATConfig(method="cluster", w_bits=3, a_bits=4, codebook_scale="channel", codebook_grid=grid,
                            refit_every=3, quantize_pool=True)
    qat = repq.prepare_qat(trained_digits_model, config, train_ds)
    repq.train(qat, train_ds, repq.TrainConfig(epochs=1, lr=0.01, weight_decay=0.0, max_steps_per_epoch=7),
               progress=False)
    q = repq.convert_qat(qat)
    x, _ = test_ds.head(len(test_ds))
    with torch.no_grad():
        assert torch.allclose(q(x), qat.eval()(x), atol=1e-4)
    name = "stage2.0.rbr_reparam"
    latent = qat.get_submodule(name).weight.detach()
    amax = latent.abs().reshape(len(latent), -1).amax(1)
    layer = q.get_submodule(name)
    if grid == "free":
        assert isinstance(layer, CodebookConv2d) and layer.per_channel
        torch.testing.assert_close(layer.channel_scale, amax)
        assert q.repq_quant["layers"][name]["codebook_scale"] == "channel"
    else:
        assert isinstance(layer, QuantConv2d) and torch.unique(layer.weight_codes).numel() <= 8
        step = qat.get_submodule(name).weight_quantizer.codebook.abs().max() / 127
        torch.testing.assert_close(layer.weight_scale, step * torch.where(amax > 0, amax, torch.ones_like(amax)))
    path = export_onnx(q, tmp_path / "m.onnx", x[:1])
    ort = run_onnx(path, x.numpy())
    with torch.no_grad():
        expected = q(x)
    if grid == "free":   # float convs on looked-up weights: the same arithmetic
        np.testing.assert_allclose(ort, expected.numpy(), atol=1e-4)
        tables = np.load(codebook_path(path))
        np.testing.assert_array_equal(tables[f"{name}.channel_scale"], layer.channel_scale.numpy())
    else:   # integer kernels: requantization ties may round the other way (as in the per-layer grid's test)
        assert (torch.from_numpy(ort).argmax(1) == expected.argmax(1)).float().mean() >= 0.99
        n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in q.modules())
        assert integer_kernels(path).get("QLinearConv", 0) == n_convs
    repq.save_checkpoint(tmp_path / "q.pt", q)
    with torch.no_grad():
        assert torch.equal(repq.load_checkpoint(tmp_path / "q.pt")[0](x), q(x))


def test_cli_codebook_scale_flag(trained_digits_model, tmp_path, capsys):
    repq.save_checkpoint(tmp_path / "fp.pt", trained_digits_model)
    out = tmp_path / "c.pt"
    assert main(["qat", "--checkpoint", str(tmp_path / "fp.pt"), "--data", "digits", "--codebook-scale", "channel",
                 "--epochs", "1", "--max-steps", "2", "--out", str(out)]) == 0
    assert repq.checkpoint.read_checkpoint(out)["quant"]["qat"]["codebook_scale"] == "channel"
    capsys.readouterr()
    assert main(["qat", "--checkpoint", str(tmp_path / "fp.pt"), "--data", "digits", "--method", "lsq",
                 "--codebook-scale", "channel", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--codebook-scale applies to --method cluster only" in capsys.readouterr().err

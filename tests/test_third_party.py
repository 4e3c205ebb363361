"""Third-party layouts, reproduced closely enough to fail on each fusion / export defect users met (issue 13):
YOLOv6 QARepVGGBlockV2's average-pool branch, timm MobileOneBlock's `attn`, RepVGGplus's `post_se` and its
`(x, L2)` call signature, the original code's `x.view(x.size(0), -1)` and `F.avg_pool2d(x, kernel_size=x.size(3))`
SE, YOLOv6's ConvModules, SimSPPF and Rep-PAN neck, and models already fused the YOLOv6 way. The layouts are in
tests/third_party_layouts.py, with those projects' attribute names and forward rules.

Each model gets random BN statistics; the fused model must equal the original (relative 1e-5, float64), and the
trained tiny classifiers must quantize, export and agree with ONNX Runtime on >= 99 % of test images.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repq
from repq.reparam import fuse_blocks, fused_blocks
from tests.conftest import randomize_bn
from tests.third_party_layouts import (BepC3, ExtraBranchBlock, OriginalRepVGG, QARepVGGBlockV2, RepVGGBlock, RepVGGplus,
                                       RepVGGplusBlock, SEBlock, SEModule, SimConv, Transpose, YOLOv6Like,
                                       qarepvgg_v2_net, timm_mobileone, yolov6_fuse_model)

pytest.importorskip("onnxruntime")
from repq.export import export_onnx  # noqa: E402
from repq.export.verify import _session  # noqa: E402


# --- helpers ----------------------------------------------------------------------------------------------------

def _main(out):
    """The main output: `main` of a dict, every level of a tuple side by side."""
    if isinstance(out, dict):
        return out["main"]
    if isinstance(out, (tuple, list)):
        return torch.cat([o.flatten(1) for o in out], 1)
    return out


def _train_briefly(net, digits, steps=120):
    train, _ = digits
    torch.manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    batches = train.batches(64, shuffle=True, seed=0)
    for step in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = train.batches(64, shuffle=True, seed=step)
            x, y = next(batches)
        loss = F.cross_entropy(_main(net(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _assert_exact(net, x):
    fused, report = fuse_blocks(net, example_input=x)
    network = report[-1] if report else {"network": True, "dtype": "float64", "relative_diff": 0.0}  # nothing to do
    assert network["network"] and network["dtype"] == "float64" and network["relative_diff"] < 1e-5, report
    with torch.no_grad():   # an independent check in float32 on other inputs
        x2 = torch.randn_like(x)
        ref, out = _main(net(x2)), _main(fused(x2))
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    return fused, report


CLASSIFIERS = {
    "yolov6_qarepvgg_v2": qarepvgg_v2_net,
    "timm_mobileone_attn": timm_mobileone,
    "repvggplus_post_se": RepVGGplus,
    "original_repvgg_d2se_view": OriginalRepVGG,
}


@pytest.mark.parametrize("name", list(CLASSIFIERS))
@torch.no_grad()
def test_fused_equals_original_with_random_bn(name):
    torch.manual_seed(1)
    net = randomize_bn(CLASSIFIERS[name](), seed=5)
    fused, report = _assert_exact(net, torch.randn(2, 1, 8, 8))
    assert fused_blocks(report)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


def test_what_each_defect_was():
    """The structures that were fused wrongly: the average-pool branch is folded, `attn` and `post_se` are kept,
    RepVGGplus goes through its own switch_to_deploy (its blocks take (x, L2))."""
    torch.manual_seed(1)
    q = randomize_bn(qarepvgg_v2_net(), seed=5)
    _, report = fuse_blocks(q, example_input=torch.randn(2, 1, 8, 8))
    assert {r["layout"] for r in fused_blocks(report)} == {"yolov6_qarepvgg"}
    m = randomize_bn(timm_mobileone(), seed=5)
    fused, _ = fuse_blocks(m, example_input=torch.randn(2, 1, 8, 8))
    assert sum(isinstance(x, SEModule) for x in fused.modules()) == 4
    p = randomize_bn(RepVGGplus(), seed=5)
    fused, report = fuse_blocks(p, example_input=torch.randn(2, 1, 8, 8))
    assert {r["layout"] for r in fused_blocks(report)} == {"switch_to_deploy()"}
    assert sum(isinstance(x, SEBlock) for x in fused.modules()) == 3


def test_unknown_branch_and_unknown_post_module_are_refused():
    block = randomize_bn(ExtraBranchBlock(8, 8), seed=1)
    with pytest.raises(repq.RepqError, match="rbr_extra") as err:
        fuse_blocks(nn.Sequential(block), example_input=torch.randn(2, 8, 6, 6))
    assert "\n" not in str(err.value)
    plus = RepVGGplusBlock(8, 8, use_post_se=True, own_deploy=False)
    with pytest.raises(repq.RepqError, match="post_se"):
        repq.reparameterize(_PlusWrap(plus), torch.randn(2, 8, 6, 6))


class _PlusWrap(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x, 0.0)[0]


def test_a_block_whose_fuse_returns_a_linear():
    """timm RepViT's classifier: BatchNorm1d + Linear with fuse() returning one Linear (was a bare StopIteration)."""
    class NormLinear(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.bn, self.l = nn.BatchNorm1d(cin), nn.Linear(cin, cout)

        def forward(self, x):
            return self.l(self.bn(x))

        @torch.no_grad()
        def fuse(self):
            t = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
            b = self.bn.bias - self.bn.running_mean * t
            linear = nn.Linear(self.l.in_features, self.l.out_features)
            linear.weight.copy_(self.l.weight * t[None])
            linear.bias.copy_(self.l.weight @ b + self.l.bias)
            return linear

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), NormLinear(4, 3))
    with torch.no_grad():
        net[-1].bn.running_mean.uniform_(-1, 1)
        net[-1].bn.running_var.uniform_(0.5, 2)
    net.eval()
    fused, report = fuse_blocks(net, example_input=torch.randn(2, 1, 8, 8))
    assert isinstance(fused[-1], nn.Linear) and report[-1]["relative_diff"] < 1e-5
    q = repq.quantize(net, torch.randn(8, 1, 8, 8), repq.PTQConfig(num_samples=8))
    assert q(torch.randn(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_trained_third_party_classifier_quantizes_and_exports(name, digits, tmp_path):
    net = _train_briefly(CLASSIFIERS[name](), digits)
    train, test = digits
    calib = train.calibration_images(32)
    q = repq.quantize(net, calib, repq.PTQConfig())
    images = test.normalize(test.images)
    with torch.no_grad():
        fp = _main(net(images)).argmax(1)
        sim = _main(q(images))
    assert (fp == test.labels).float().mean() > 0.3      # it learned something (chance: 0.1; 120 steps only) ...
    assert (sim.argmax(1) == fp).float().mean() > 0.9    # ... and the quantized model kept it
    path = export_onnx(q, tmp_path / f"{name}.onnx", calib[:1])
    session = _session(path)
    names = [o.name for o in session.get_outputs()]
    out = session.run(None, {"input": images.numpy()})
    main = out[names.index("output_main")] if "output_main" in names else out[0]
    agreement = float((main.argmax(1) == sim.argmax(1).numpy()).mean())
    assert agreement >= 0.99, agreement


@torch.no_grad()
def test_yolov6_like_detector_fuses_quantizes_and_exports(tmp_path):
    """EfficientRep (RepVGG blocks, SimSPPF with max-pools and cat), Rep-PAN neck (upsample, interpolate, cat,
    SimConv stems) and a decoupled head with three outputs: exact fusion (blocks by layout, ConvModules by the
    generic conv+BN fold), PTQ, and ONNX Runtime equal to the simulation."""
    torch.manual_seed(2)
    net = randomize_bn(YOLOv6Like(), seed=7)
    x = torch.randn(2, 1, 32, 32)
    fused, report = _assert_exact(net, x)
    folds = [r for r in report if "bn" in r]
    assert len(folds) == sum(isinstance(m, SimConv) for m in net.modules())
    calib = torch.randn(16, 1, 32, 32)
    q = repq.quantize(net, calib, repq.PTQConfig(num_samples=16))
    path = export_onnx(q, tmp_path / "det.onnx", calib[:1])
    session = _session(path)
    assert [o.name for o in session.get_outputs()] == ["output_0", "output_1", "output_2"]
    images = torch.randn(8, 1, 32, 32)
    sims = q(images)
    outs = session.run(None, {"input": images.numpy()})
    for sim, out in zip(sims, outs):
        assert out.shape == tuple(sim.shape)
        # the same integer arithmetic: differences are rare one-code flips, not a drift
        close = np.abs(out - sim.numpy()) <= 1e-3 + 0.02 * np.abs(sim.numpy()).max()
        assert close.mean() > 0.99, close.mean()


@pytest.mark.filterwarnings("ignore:no re-parameterizable block")
@torch.no_grad()
def test_yolov6_model_fused_the_yolov6_way_and_qarepvgg_backbone():
    """A model loaded as YOLOv6 deploys it (switch_to_deploy + fuse_model) is recognized: the QARepVGG post-sum BN
    that YOLOv6 keeps after rbr_reparam folds into it; a QARepVGGBlockV2 backbone fuses too."""
    torch.manual_seed(3)
    for block in (RepVGGBlock, QARepVGGBlockV2):
        net = randomize_bn(YOLOv6Like(block=block), seed=8)
        x = torch.randn(2, 1, 32, 32)
        _assert_exact(net, x)
        deployed = yolov6_fuse_model(randomize_bn(YOLOv6Like(block=block), seed=8))
        fused, report = _assert_exact(deployed, x)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        q = repq.quantize(deployed, torch.randn(8, 1, 32, 32), repq.PTQConfig(num_samples=8))
        assert len(q(x)) == 3


@torch.no_grad()
def test_a_layer_repq_cannot_quantize_is_kept_in_float_when_asked(tmp_path):
    torch.manual_seed(4)
    net = randomize_bn(YOLOv6Like(), seed=9)
    net.neck.upsample0 = Transpose(16, 16)
    calib = torch.randn(16, 1, 32, 32)
    with pytest.raises(repq.RepqError, match=r"skip_layers=\['neck.upsample0.upsample_transpose'\]"):
        repq.quantize(net, calib, repq.PTQConfig(num_samples=16))
    with pytest.raises(repq.RepqError, match="matches no layer"):
        repq.quantize(net, calib, repq.PTQConfig(num_samples=16, skip_layers=("neck.nothing*",)))
    config = repq.PTQConfig(num_samples=16, skip_layers=("neck.upsample0.*", "detect.cls_preds.*"))
    q = repq.quantize(net, calib, config)
    kept = q.repq_quant["float_layers"]
    assert kept == ["detect.cls_preds.0", "detect.cls_preds.1", "detect.cls_preds.2",
                    "neck.upsample0.upsample_transpose"]
    assert type(q.detect.cls_preds[0]) is nn.Conv2d and "detect.cls_preds.0" not in q.repq_quant["layers"]
    path = export_onnx(q, tmp_path / "det.onnx", calib[:1])
    images = torch.randn(4, 1, 32, 32)
    for sim, out in zip(q(images), _session(path).run(None, {"input": images.numpy()})):
        close = np.abs(out - sim.numpy()) <= 1e-3 + 0.02 * np.abs(sim.numpy()).max()
        assert close.mean() > 0.99


@torch.no_grad()
def test_bepc3_stage_with_learned_alpha(tmp_path):
    """YOLOv6 v3's BepC3: ConvModules, cat, BottleRep pairs of RepVGG blocks with a learned residual alpha (a
    parameter on a container, applied in float)."""
    torch.manual_seed(6)
    net = nn.Sequential(RepVGGBlock(1, 8, 2), BepC3(8, 16, n=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 4))
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "alpha") and isinstance(m.alpha, nn.Parameter):
                m.alpha.fill_(0.7)
    net = randomize_bn(net, seed=2)
    x = torch.randn(2, 1, 16, 16)
    fused, report = _assert_exact(net, x)
    assert len(fused_blocks(report)) == 5 and sum("bn" in r for r in report) == 3
    calib = torch.randn(16, 1, 16, 16)
    q = repq.quantize(net, calib, repq.PTQConfig(num_samples=16))
    path = export_onnx(q, tmp_path / "bepc3.onnx", calib[:1])
    images = torch.randn(64, 1, 16, 16)
    out = _session(path).run(None, {"input": images.numpy()})[0]
    sim = q(images).numpy()
    assert np.abs(out - sim).max() <= 0.02 * np.abs(sim).max()


def test_yolov6_training_checkpoint_is_read_without_running_code(tmp_path):
    """YOLOv6 saves {"model": deepcopy(model).half(), "ema": ...}: a pickled module. repq reads its tensors with
    every class resolved to an inert stand-in; a file whose pickle would call os.system runs nothing."""
    import os

    torch.manual_seed(5)
    net = randomize_bn(YOLOv6Like(), seed=3)
    torch.save({"model": YOLOv6Like().half(), "ema": __import__("copy").deepcopy(net).half(), "epoch": 3},
               tmp_path / "yolov6.pt")
    state = repq.read_state_dict(tmp_path / "yolov6.pt")
    fresh = YOLOv6Like()
    fresh.load_state_dict(state)   # every key and shape, from the EMA model
    assert torch.equal(fresh.state_dict()["backbone.stem.rbr_dense.bn.running_var"],
                       net.half().float().state_dict()["backbone.stem.rbr_dense.bn.running_var"])

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(repq.RepqError, match="holds no model object"):
        repq.read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()

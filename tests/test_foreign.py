"""Foreign checkpoints: an mmpretrain-layout RepVGG (its own modules and forward, written here with OpenMMLab's
attribute names) and an original-layout one load into repq's RepVGG and give the same outputs."""
import json

import pytest
import torch
from torch import nn

import repq
from repq.cli import main
from repq.foreign import load_foreign_weights
from repq.models.blocks import RepVGGBlock
from repq.reparam import fuse_blocks, fused_blocks
from tests.conftest import randomize_bn, tiny


def mm_conv_bn(cin, cout, k, stride, groups):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("norm", nn.BatchNorm2d(cout))
    return seq


class MMRepVGGBlock(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        self.branch_norm = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.branch_3x3 = mm_conv_bn(cin, cout, 3, stride, groups)
        self.branch_1x1 = mm_conv_bn(cin, cout, 1, stride, groups)
        self.se_layer, self.act = None, nn.ReLU()

    def forward(self, x):
        out = self.branch_3x3(x) + self.branch_1x1(x) + (0 if self.branch_norm is None else self.branch_norm(x))
        return self.act(out)


class MMRepVGG(nn.Module):
    """mmpretrain's names: backbone.stem, backbone.stage_1..4, head.fc (as its repvgg-to-mmpretrain converter writes
    them); the channel plan copied from a repq model."""

    def __init__(self, like: nn.Module):
        super().__init__()
        self.backbone = nn.Module()

        def mm(block: RepVGGBlock):
            return MMRepVGGBlock(block.in_chans, block.out_chans, block.stride, block.groups)
        self.backbone.stem = mm(like.stage0)
        for i in range(1, 5):
            setattr(self.backbone, f"stage_{i}", nn.Sequential(*[mm(b) for b in getattr(like, f"stage{i}")]))
        self.head = nn.Module()
        self.head.fc = nn.Linear(like.linear.in_features, like.linear.out_features)

    def forward(self, x):
        b = self.backbone
        x = b.stage_4(b.stage_3(b.stage_2(b.stage_1(b.stem(x)))))
        return self.head.fc(x.mean((2, 3)))


@torch.no_grad()
def test_mmpretrain_checkpoint_loads_and_matches(tmp_path):
    torch.manual_seed(0)
    source = randomize_bn(MMRepVGG(tiny("repvgg_b1g2")), seed=9)
    torch.save({"meta": {"mmpretrain_version": "1.2.0"}, "state_dict": source.state_dict()}, tmp_path / "mm.pth")
    model = tiny("repvgg_b1g2")
    load_foreign_weights(model, tmp_path / "mm.pth")
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(model.eval()(x), source(x), atol=1e-5)
    report = fused_blocks(fuse_blocks(source)[1])  # the mmpretrain blocks themselves fuse through their adapter
    assert {r["layout"] for r in report} == {"mmpretrain_repvgg"} and max(r["relative_diff"] for r in report) < 1e-4


@torch.no_grad()
def test_original_checkpoint_with_ddp_prefix(tmp_path):
    source = randomize_bn(tiny(), seed=2)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "orig.pth")
    model = load_foreign_weights(tiny(), tmp_path / "orig.pth")
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(model.eval()(x), source(x))
    fused = repq.reparameterize(source)  # a deploy (rbr_reparam) checkpoint loads into the deploy form
    torch.save(fused.state_dict(), tmp_path / "deploy.pth")
    deploy = load_foreign_weights(tiny(deploy=True), tmp_path / "deploy.pth")
    assert torch.allclose(deploy.eval()(x), fused(x), atol=1e-6)


def test_mismatches_and_bad_files_are_one_line(tmp_path):
    torch.save(tiny().state_dict(), tmp_path / "a0.pth")
    with pytest.raises(repq.RepqError) as err:
        load_foreign_weights(tiny(num_classes=5), tmp_path / "a0.pth")
    assert "\n" not in str(err.value) and "other shapes" in str(err.value) and "num_classes=5" in str(err.value)
    torch.save({"conv.weight": torch.ones(1)}, tmp_path / "other.pth")
    with pytest.raises(repq.RepqError, match="unknown checkpoint layout"):
        load_foreign_weights(tiny(), tmp_path / "other.pth")
    with pytest.raises(repq.RepqError, match="not found"):
        load_foreign_weights(tiny(), tmp_path / "missing.pth")


def test_cli_import_then_load(tmp_path, capsys):
    source = randomize_bn(repq.create_model("repvgg_a0", num_classes=10, in_chans=1, small_input=True), seed=3)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "orig.pth")
    out = tmp_path / "imported.pt"
    assert main(["import", "--weights", str(tmp_path / "orig.pth"), "--model", "repvgg_a0", "--num-classes", "10",
                 "--in-chans", "1", "--small-input", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["command"] == "import"
    loaded, _ = repq.load_checkpoint(out)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    assert main(["import", "--weights", str(tmp_path / "orig.pth"), "--model", "repvgg_a0", "--out",
                 str(tmp_path / "x.pt")]) == 2  # 1000 classes, 3 channels: does not fit

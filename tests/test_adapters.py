"""Block adapters: modules with the exact attribute layouts of the original RepVGG, YOLOv6 (RepVGG and QARepVGG),
timm (RepVggBlock, MobileOneBlock) and MobileOne fuse to one conv that equals them (random BN statistics).
The modules are written here with those projects' attribute names and forward rules (timm is not installed:
it needs a multi-GB torchvision build on this machine)."""
import pytest
import torch
from torch import nn

import repq
from repq.reparam import fuse_blocks, fused_blocks, match_layout
from tests.conftest import randomize_bn
from tests.third_party_layouts import ConvNormAct


def conv_bn(cin, cout, k, stride, groups=1):
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.down, self.up = nn.Conv2d(c, max(1, c // 4), 1), nn.Conv2d(max(1, c // 4), c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.up(torch.relu(self.down(x.mean((2, 3), keepdim=True)))))


class OriginalRepVGGBlock(nn.Module):  # DingXiaoH/RepVGG, YOLOv6 RepVGGBlock
    def __init__(self, cin, cout, stride=1, groups=1, use_se=False):
        super().__init__()
        self.nonlinearity, self.se = nn.ReLU(), (SE(cout) if use_se else nn.Identity())
        self.rbr_identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_dense, self.rbr_1x1 = conv_bn(cin, cout, 3, stride, groups), conv_bn(cin, cout, 1, stride, groups)

    def forward(self, x):
        ident = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + ident))


class QARepVGGBlock(nn.Module):  # YOLOv6 v3: BN after the sum (and after se), no BN on the 1x1, plain identity
    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.nonlinearity, self.se = nn.ReLU(), nn.Identity()
        self.rbr_dense = conv_bn(cin, cout, 3, stride, groups)
        self.rbr_1x1 = nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False)
        self.rbr_identity = nn.Identity() if cin == cout and stride == 1 else None
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        ident = 0 if self.rbr_identity is None else self.rbr_identity(x)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(x) + self.rbr_1x1(x) + ident)))


class TimmRepVggBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.conv_kxk, self.conv_1x1 = ConvNormAct(cin, cout, 3, stride, groups), ConvNormAct(cin, cout, 1, stride,
                                                                                             groups)
        self.drop_path, self.attn, self.act = nn.Identity(), nn.Identity(), nn.ReLU()

    def forward(self, x):
        out = self.conv_1x1(x) + self.conv_kxk(x)
        if self.identity is not None:
            out = self.drop_path(out) + self.identity(x)
        return self.act(self.attn(out))


class TimmMobileOneBlock(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, groups=1, branches=3):
        super().__init__()
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.conv_kxk = nn.ModuleList([ConvNormAct(cin, cout, k, stride, groups) for _ in range(branches)])
        self.conv_scale = ConvNormAct(cin, cout, 1, stride, groups) if k > 1 else None
        self.se, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        out = sum(conv(x) for conv in self.conv_kxk)
        if self.conv_scale is not None:
            out = out + self.conv_scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(self.se(out))


class AppleMobileOneBlock(nn.Module):  # apple/ml-mobileone
    def __init__(self, cin, cout, k=3, stride=1, groups=1, branches=2):
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_conv = nn.ModuleList([conv_bn(cin, cout, k, stride, groups) for _ in range(branches)])
        self.rbr_scale = conv_bn(cin, cout, 1, stride, groups) if k > 1 else None
        self.se, self.activation = nn.Identity(), nn.ReLU()

    def forward(self, x):
        out = sum(conv(x) for conv in self.rbr_conv)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        if self.rbr_skip is not None:
            out = out + self.rbr_skip(x)
        return self.activation(self.se(out))


CASES = {
    "original_repvgg": lambda: [OriginalRepVGGBlock(4, 8, 2), OriginalRepVGGBlock(8, 8, use_se=True),
                                OriginalRepVGGBlock(8, 8, groups=2)],
    "yolov6_qarepvgg": lambda: [QARepVGGBlock(4, 8, 2), QARepVGGBlock(8, 8), QARepVGGBlock(8, 8, groups=4)],
    "timm_repvgg": lambda: [TimmRepVggBlock(4, 8, 2), TimmRepVggBlock(8, 8), TimmRepVggBlock(8, 8, groups=2)],
    "timm_mobileone": lambda: [TimmMobileOneBlock(4, 4, stride=2, groups=4), TimmMobileOneBlock(4, 8, k=1),
                               TimmMobileOneBlock(8, 8, groups=8), TimmMobileOneBlock(8, 8, k=1)],
    "mobileone": lambda: [AppleMobileOneBlock(4, 4, stride=2, groups=4), AppleMobileOneBlock(4, 8, k=1),
                          AppleMobileOneBlock(8, 8, groups=8), AppleMobileOneBlock(8, 8, k=1)],
}


def make_net(blocks):
    torch.manual_seed(0)
    net = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return randomize_bn(net, seed=4)


@pytest.mark.parametrize("layout", list(CASES))
@torch.no_grad()
def test_each_layout_fuses_exactly(layout):
    net = make_net(CASES[layout]())
    for block in list(net)[:-3]:
        assert match_layout(block).name == layout
    fused, report = fuse_blocks(net)
    blocks = fused_blocks(report)
    assert [r["layout"] for r in blocks] == [layout] * (len(net) - 3)
    assert all(r["relative_diff"] < 1e-5 for r in blocks), report
    x = torch.randn(3, 4, 12, 12)
    ref = net(x)
    assert (fused(x) - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the input model is untouched


@pytest.mark.parametrize("layout", ["yolov6_qarepvgg", "timm_mobileone"])
@torch.no_grad()
def test_foreign_models_quantize(layout):
    net = make_net(CASES[layout]())
    images = torch.randn(16, 4, 12, 12)
    q = repq.quantize(net, images, repq.PTQConfig(weight="cfws", activation="minmax", num_samples=16))
    ref = net(images)
    assert (q(images) - ref).abs().max() < 0.1 * float(ref.abs().max())


@pytest.mark.filterwarnings("ignore:no re-parameterizable block")
def test_qarepvgg_with_a_real_se_is_not_fused_wrongly():
    block = QARepVGGBlock(8, 8)
    assert match_layout(block).name == "yolov6_qarepvgg"
    block.se = SE(8)   # YOLOv6 computes bn(se(sum)): the BN cannot be folded into the conv through an SE
    assert match_layout(block) is None
    with pytest.raises(repq.RepqError, match="unsupported layer BatchNorm2d"):
        repq.quantize(nn.Sequential(block), torch.randn(4, 8, 8, 8), repq.PTQConfig(num_samples=4))


def test_plain_and_unknown_modules_are_left_alone():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert match_layout(plain[0]) is None and match_layout(plain) is None
    fused, report = fuse_blocks(plain)
    assert report == [] and isinstance(fused[0], nn.Conv2d)


def test_cli_ptq_on_a_timm_model(tmp_path, capsys, monkeypatch):
    """`repq ptq --timm NAME`: timm is replaced by a stand-in whose create_model returns timm-layout blocks
    (real timm needs a multi-GB torchvision build on this machine)."""
    import json
    import sys
    import types

    from repq.cli import main

    def create_model(name, pretrained=False, num_classes=1000, in_chans=3):
        assert name == "repvgg_a0" and not pretrained
        torch.manual_seed(0)
        return nn.Sequential(TimmRepVggBlock(in_chans, 8, 2), TimmRepVggBlock(8, 8), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, num_classes))
    torch.save(randomize_bn(create_model("repvgg_a0", num_classes=10, in_chans=1)).state_dict(), tmp_path / "w.pth")
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    args = ["ptq", "--timm", "repvgg_a0", "--checkpoint", str(tmp_path / "w.pth"), "--data", "digits", "--calib", "8"]
    assert main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["results"][0]["weight"] == "cfws" and result["fp"]["n"] > 0
    assert main(args + ["--out", str(tmp_path / "q.pt")]) == 2
    monkeypatch.setitem(sys.modules, "timm", None)  # not installed
    assert main(args) == 2 and "needs timm" in capsys.readouterr().err

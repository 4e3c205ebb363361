"""Re-parameterization: folding against hand computations, and fused == train-time for the whole family."""
import pytest
import torch
from torch import nn

import repq
from repq.models.yolo import is_detector
from repq.models.blocks import FusedConvAct, RepVGGBlock, SEBlock
from repq.reparam import fold_bn, identity_kernel, match_layout, merge_branches, pad_to
from tests.conftest import randomize_bn, tiny


def test_fold_bn_matches_conv_then_bn():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(6)))[0]
    x = torch.randn(2, 4, 9, 9)
    w, b = fold_bn(conv.weight, bn)
    expected = bn(conv(x))
    # hand formula: t = gamma / sqrt(var + eps), W' = t W, b' = beta - t mu
    t = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert torch.allclose(w, conv.weight * t[:, None, None, None])
    assert torch.allclose(b, bn.bias - t * bn.running_mean)
    assert torch.allclose(nn.functional.conv2d(x, w, b, padding=1), expected, atol=1e-5)


@pytest.mark.parametrize("channels,groups", [(4, 1), (8, 2), (8, 4)])
def test_identity_kernel_is_identity(channels, groups):
    x = torch.randn(2, channels, 5, 5)
    eye = identity_kernel(channels, groups)
    assert eye.shape == (channels, channels // groups, 3, 3)
    assert eye.sum() == channels
    assert torch.equal(nn.functional.conv2d(x, eye, padding=1, groups=groups), x)


def test_pad_and_merge():
    k1 = torch.randn(3, 2, 1, 1)
    padded = pad_to(k1, 3)
    assert torch.equal(padded[:, :, 1, 1], k1[:, :, 0, 0]) and padded.abs().sum() == k1.abs().sum()
    w, b = merge_branches([(torch.ones(3, 2, 3, 3), torch.ones(3)), (k1, torch.full((3,), 2.0))], 3)
    assert torch.allclose(w[:, :, 1, 1], 1 + k1[:, :, 0, 0]) and torch.equal(b, torch.full((3,), 3.0))


@pytest.mark.parametrize("stride,cin,cout,groups", [(1, 8, 8, 1), (2, 8, 8, 1), (1, 4, 8, 1), (1, 8, 8, 2),
                                                    (1, 8, 8, 4), (2, 4, 8, 2)])
def test_block_fuses_exactly(stride, cin, cout, groups):
    torch.manual_seed(1)
    block = randomize_bn(RepVGGBlock(cin, cout, stride, groups))
    assert (block.rbr_identity is not None) == (cin == cout and stride == 1)
    x = torch.randn(3, cin, 10, 10)
    fused = block.fuse()
    ref = block(x)
    assert (fused(x) - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max())


@pytest.mark.parametrize("name", [n for n in repq.list_models() if not is_detector({"name": n})])
def test_every_architecture_fuses_exactly(name):
    """Every classifier (detectors: tests/test_detection.py)."""
    torch.manual_seed(0)
    model = randomize_bn(tiny(name), seed=3)
    x = torch.randn(2, 1, 32, 32)
    fused = repq.reparameterize(model)
    ref = model(x)
    assert (fused(x) - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock) or match_layout(m) is not None]
    convs = [m for n, m in fused.named_modules() if isinstance(m, nn.Conv2d) and ".se." not in n]
    assert len(convs) == len(blocks) > 0
    assert all(isinstance(m, (FusedConvAct, nn.Conv2d, nn.ReLU, nn.Identity, nn.Sequential, nn.AdaptiveAvgPool2d,
                              nn.Linear, SEBlock, type(fused))) for m in fused.modules())
    deploy = tiny(name, deploy=True)
    deploy.load_state_dict(fused.state_dict())  # the deploy build has the fused form's keys


def test_group_layout_matches_original_repvgg():
    model = tiny("repvgg_b1g4")
    blocks = [m for n, m in model.named_modules() if isinstance(m, RepVGGBlock) and n != "stage0"]
    assert [b.groups for b in blocks[:4]] == [1, 4, 1, 4]
    assert model.stage0.groups == 1


def test_reparameterize_leaves_input_untouched_and_matches_deploy_build():
    model = randomize_bn(tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = repq.reparameterize(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, RepVGGBlock) for m in model.modules())
    deploy = tiny(deploy=True)
    deploy.load_state_dict(fused.state_dict())  # same keys as a model built in deploy form
    assert fused.repq_config["deploy"] is True


def test_original_repvgg_key_layout():
    keys = set(repq.create_model("repvgg_a0").state_dict())
    for key in ("stage0.rbr_dense.conv.weight", "stage0.rbr_dense.bn.running_var", "stage0.rbr_1x1.conv.weight",
                "stage1.1.rbr_identity.weight", "stage4.0.rbr_1x1.bn.bias", "linear.weight", "linear.bias"):
        assert key in keys
    deploy = set(repq.create_model("repvgg_a0", deploy=True).state_dict())
    assert {"stage0.rbr_reparam.weight", "stage3.13.rbr_reparam.bias"} <= deploy


def test_architecture_widths_follow_the_paper():
    a0 = repq.create_model("repvgg_a0")
    assert a0.stage0.out_chans == 48 and a0.stage4[0].out_chans == 1280 and len(a0.stage3) == 14
    b1 = repq.create_model("repvgg_b1")
    assert b1.stage0.out_chans == 64 and b1.stage1[0].out_chans == 128 and len(b1.stage3) == 16
    assert b1.linear.in_features == 2048


def test_nan_weights_are_refused():
    model = tiny()
    with torch.no_grad():
        model.stage1[0].rbr_dense.conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(repq.RepqError, match="NaN"):
        repq.reparameterize(model)

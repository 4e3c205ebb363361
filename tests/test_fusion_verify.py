"""Generic conv+BN folding and fusion verification: folds are checked against the unfolded computation, pairs that
must not fold are left alone, and a fused form that differs from its block is refused with a one-line error."""
import pytest
import torch
from torch import nn

import repq
from repq.reparam import fold_conv_bn, fuse_blocks
from tests.conftest import randomize_bn


class ConvModule(nn.Module):   # mmcv / YOLOv6 ConvModule-like: conv (with bias), then BN, then activation
    def __init__(self, cin, cout, k=3, stride=1, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=bias)
        self.norm = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


@torch.no_grad()
def test_conv_bn_pairs_fold_exactly_whatever_their_names():
    net = randomize_bn(nn.Sequential(ConvModule(3, 8, bias=True), ConvModule(8, 8, 1, 2, bias=False),
                                     nn.Conv2d(8, 4, 3), nn.Identity(), nn.BatchNorm2d(4)), seed=3)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    ref = net.double()(x)
    folded = fold_conv_bn(net)
    assert [f["bn"] for f in folded] == ["0.norm", "1.norm", "4"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert (net(x) - ref).abs().max() <= 1e-10 * ref.abs().max()


@torch.no_grad()
def test_pairs_that_must_not_fold_are_left_alone():
    class Shared(nn.Module):   # one BN after two convs, a conv read elsewhere, a BN before its conv
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
            self.c, self.bn_c = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
            self.pre, self.d = nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1)

        def forward(self, x):
            y = self.bn(self.a(x)) + self.bn(self.b(x))
            z = self.bn_c(self.c(x)) * self.c.weight.mean()
            return y + z + self.d(self.pre(x))
    net = randomize_bn(Shared())
    x = torch.randn(2, 2, 5, 5)
    ref = net(x)
    assert fold_conv_bn(net) == []
    assert torch.equal(net(x), ref)


class BuggyBlock(nn.Module):
    """A multi-branch block whose own switch_to_deploy forgets its 1x1 branch."""

    def __init__(self, c):
        super().__init__()
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        if hasattr(self, "fused"):
            return self.fused(x)
        return self.k3(x) + self.k1(x)

    def switch_to_deploy(self):
        conv, bn = self.k3
        t = bn.weight / (bn.running_var + bn.eps).sqrt()
        self.fused = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1)
        self.fused.weight.data = conv.weight * t.reshape(-1, 1, 1, 1)
        self.fused.bias.data = bn.bias - bn.running_mean * t
        del self.k3, self.k1


def test_a_wrong_fusion_is_refused_with_one_line():
    net = randomize_bn(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), BuggyBlock(4)), seed=2)
    with pytest.raises(repq.RepqError, match=r"fusion of '1' \(BuggyBlock, switch_to_deploy\(\)\) does not match") \
            as err:
        fuse_blocks(net, example_input=torch.randn(2, 1, 6, 6))
    assert "\n" not in str(err.value)
    with pytest.raises(repq.RepqError, match="does not match"):   # quantize verifies too
        repq.quantize(net, torch.randn(4, 1, 6, 6), repq.PTQConfig(num_samples=4))


def test_verification_needs_a_runnable_input():
    net = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)))
    with pytest.raises(repq.RepqError, match="pass an example input"):
        fuse_blocks(net)   # the guessed 32x32 input does not fit the Linear
    fused, report = fuse_blocks(net, example_input=torch.randn(2, 3, 8, 8))
    assert report[-1]["relative_diff"] < 1e-5


def test_a_reparameterize_that_takes_arguments_is_not_a_deploy_method():
    class VAEHead(nn.Module):   # the VAE meaning of the name: called with tensors, never a deploy switch
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(self.conv(x))

        def reparameterize(self, mu, logvar):
            return mu + logvar

    net = randomize_bn(nn.Sequential(VAEHead(), nn.ReLU()))
    fused, report = fuse_blocks(net, example_input=torch.randn(2, 1, 6, 6))
    assert [r["bn"] for r in report if "bn" in r] == ["0.bn"] and report[-1]["relative_diff"] < 1e-5

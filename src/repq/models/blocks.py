"""RepVGG building blocks: the multi-branch training block and its single-conv inference form.

Attribute names follow the original RepVGG code (`rbr_dense.conv/bn`, `rbr_1x1`, `rbr_identity`, `rbr_reparam`)
so that its train-time and deploy checkpoints load without a key map.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

from repq.models.oabn import OABNConfig, OutlierAwareBatchNorm2d, relative_bound
from repq.reparam.adapters import LAYOUT_BY_NAME, merge_block
from repq.reparam.fold import fold_bn

NormFactory = Callable[[int], nn.Module]


class ConvBN(nn.Sequential):
    """A bias-free conv followed by BatchNorm (children named `conv` and `bn`, as in the original code)."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int, padding: int, groups: int,
                 norm_layer: NormFactory = nn.BatchNorm2d):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False),
            bn=norm_layer(out_chans),
        ))

    def folded(self) -> tuple[Tensor, Tensor]:
        return fold_bn(self.conv.weight, self.bn)


class SEBlock(nn.Module):
    """Squeeze-and-excitation of the original RepVGG-D2se (`down`/`up` 1x1 convs, internal width C/16), applied to
    the branch sum before the ReLU; it stays after the fused conv."""

    def __init__(self, channels: int, internal: int):
        super().__init__()
        self.down = nn.Conv2d(channels, internal, 1, bias=True)
        self.up = nn.Conv2d(internal, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.sigmoid(self.up(torch.relu(self.down(x.mean((2, 3), keepdim=True)))))
        return x * gate


def _se(out_chans: int, use_se: bool) -> nn.Module:
    return SEBlock(out_chans, max(1, out_chans // 16)) if use_se else nn.Identity()


class FusedConvAct(nn.Module):
    """The deploy form of a block: one conv with bias, then SE (D2se) and ReLU (`rbr_reparam`, `se`,
    `nonlinearity`)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int, groups: int, kernel_size: int = 3,
                 use_se: bool = False):
        super().__init__()
        self.rbr_reparam = nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups,
                                     bias=True)
        self.se = _se(out_chans, use_se)
        self.nonlinearity = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.nonlinearity(self.se(self.rbr_reparam(x)))


class RepVGGBlock(nn.Module):
    """y = ReLU(SE(BN3(K3 * x) + BN1(K1 * x) + [C_in == C_out and s == 1] BN0(x))), SE only with `use_se`
    (D2se); with `oabn`, the chosen branches use OutlierAwareBatchNorm2d (methods.md section 4)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1, groups: int = 1,
                 oabn: OABNConfig | None = None, use_se: bool = False):
        super().__init__()
        self.in_chans, self.out_chans, self.stride, self.groups = in_chans, out_chans, stride, groups
        self.use_se = use_se
        self.oabn = oabn
        self.rbr_dense = ConvBN(in_chans, out_chans, 3, stride, 1, groups, self._norm("all"))
        self.rbr_1x1 = ConvBN(in_chans, out_chans, 1, stride, 0, groups, self._norm("identity+1x1", "all"))
        has_identity = in_chans == out_chans and stride == 1
        self.rbr_identity = self._norm("identity", "identity+1x1", "all")(in_chans) if has_identity else None
        self.se = _se(out_chans, use_se)
        self.nonlinearity = nn.ReLU()

    def _norm(self, *oabn_branches: str) -> NormFactory:
        """OABN where the config's `branches` option is one of `oabn_branches`, plain BatchNorm2d elsewhere."""
        if self.oabn is None or self.oabn.branches not in oabn_branches:
            return nn.BatchNorm2d
        cfg = self.oabn
        return lambda channels: OutlierAwareBatchNorm2d(channels, rule=cfg.rule, tau=cfg.tau)

    def _refresh_relative_bounds(self) -> None:
        """The relative rule: tau = k * max |t3 K3| per output channel, for the identity and 1x1 OABNs."""
        bound = relative_bound(self.rbr_dense.conv.weight, self.rbr_dense.bn, self.oabn.k)
        for bn in (self.rbr_1x1.bn, self.rbr_identity):
            if isinstance(bn, OutlierAwareBatchNorm2d):
                bn.set_bound(bound)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.oabn is not None and self.oabn.rule == "relative":
            self._refresh_relative_bounds()
        z = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            z = z + self.rbr_identity(x)
        return self.nonlinearity(self.se(z))

    @torch.no_grad()
    def fuse(self) -> FusedConvAct:
        """The original RepVGG layout, merged by the shared adapter code, into the deploy form (`rbr_reparam`)."""
        weight, bias = merge_block(self, LAYOUT_BY_NAME["original_repvgg"])
        fused = FusedConvAct(self.in_chans, self.out_chans, self.stride, self.groups, use_se=self.use_se)
        fused = fused.to(weight.device, weight.dtype)
        fused.rbr_reparam.weight.copy_(weight)
        fused.rbr_reparam.bias.copy_(bias)
        if self.use_se:
            fused.se.load_state_dict(self.se.state_dict())
        return fused

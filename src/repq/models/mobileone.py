"""Two more re-parameterized families, so CFWS and the improved KL are exercised beyond RepVGG:

- `mobileone_s0`: MobileOne-S0-like (Vasu et al. 2023): every layer is a depthwise k x k MobileOne block followed by
  a pointwise 1x1 one, each with k parallel conv+BN branches, a 1x1 "scale" branch and a BN skip. Attribute names
  follow apple/ml-mobileone (`rbr_conv`, `rbr_scale`, `rbr_skip`, `se`, `activation`).
- `efficientrep_n`: the YOLOv6-N EfficientRep backbone layout (RepVGG blocks: a stride-2 block then a RepBlock per
  stage; channels 16-256, repeats 1/2/4/6/2) with a classification head instead of SPPF and the detection neck.

Both fuse through the block adapters; `deploy=True` builds the fused form with the same state-dict keys.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from repq.models.blocks import ConvBN, FusedConvAct, RepVGGBlock
from repq.models.registry import register_model


class MobileOneBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, groups: int, branches: int):
        super().__init__()
        self.rbr_skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None
        self.rbr_scale = ConvBN(cin, cout, 1, stride, 0, groups) if kernel_size > 1 else None
        self.rbr_conv = nn.ModuleList([ConvBN(cin, cout, kernel_size, stride, kernel_size // 2, groups)
                                       for _ in range(branches)])
        self.se, self.activation = nn.Identity(), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = sum(conv(x) for conv in self.rbr_conv)
        if self.rbr_scale is not None:
            out = out + self.rbr_scale(x)
        if self.rbr_skip is not None:
            out = out + self.rbr_skip(x)
        return self.activation(self.se(out))


def fused_mobileone_block(cin: int, cout: int, kernel_size: int, stride: int, groups: int) -> nn.Sequential:
    """The form the MobileOne adapter produces: conv (with bias), then the kept `se` and `activation`."""
    conv = nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, groups=groups, bias=True)
    return nn.Sequential(OrderedDict(conv=conv, se=nn.Identity(), activation=nn.ReLU()))


class MobileOne(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, small_input: bool = False,
                 width_scale: float = 1.0, deploy: bool = False, branches: int = 4,
                 depths: tuple[int, ...] = (2, 8, 10, 1), widths: tuple[float, ...] = (0.75, 1.0, 1.0, 2.0)):
        super().__init__()

        def block(cin, cout, k, stride, groups):
            if deploy:
                return fused_mobileone_block(cin, cout, k, stride, groups)
            return MobileOneBlock(cin, cout, k, stride, groups, branches)

        channels = [max(1, int(c * w * width_scale)) for c, w in zip((64, 128, 256, 512), widths)]
        stem = min(int(64 * width_scale), channels[0])
        self.stage0 = block(in_chans, stem, 3, 1 if small_input else 2, 1)
        layers, cin = [], stem
        for depth, cout in zip(depths, channels):
            for i in range(depth):
                stride = 2 if i == 0 else 1
                layers += [block(cin, cin, 3, stride, cin), block(cin, cout, 1, 1, 1)]  # depthwise, pointwise
                cin = cout
        self.features = nn.Sequential(*layers)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.gap(self.features(self.stage0(x))).flatten(1))


class EfficientRep(nn.Module):
    def __init__(self, num_classes: int = 1000, in_chans: int = 3, small_input: bool = False,
                 width_scale: float = 1.0, deploy: bool = False,
                 channels: tuple[int, ...] = (16, 32, 64, 128, 256), repeats: tuple[int, ...] = (1, 2, 4, 6, 2)):
        super().__init__()

        def block(cin, cout, stride):
            return FusedConvAct(cin, cout, stride, 1) if deploy else RepVGGBlock(cin, cout, stride)

        widths = [max(1, int(c * width_scale)) for c in channels]
        self.stem = block(in_chans, widths[0], 1 if small_input else 2)
        stages = []
        for cin, cout, n in zip(widths[:-1], widths[1:], repeats[1:]):
            stages.append(nn.Sequential(block(cin, cout, 2), *[block(cout, cout, 1) for _ in range(n)]))
        self.stages = nn.Sequential(*stages)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.gap(self.stages(self.stem(x))).flatten(1))


@register_model
def mobileone_s0(**kwargs) -> MobileOne:
    """MobileOne-S0-like: 4 conv branches, widths (0.75, 1, 1, 2) x (64, 128, 256, 512), depths (2, 8, 10, 1)."""
    return MobileOne(**kwargs)


@register_model
def efficientrep_n(**kwargs) -> EfficientRep:
    """YOLOv6-N EfficientRep backbone layout with a classification head."""
    return EfficientRep(**kwargs)

"""A YOLOv6-style anchor-free detector built from repq's blocks (Li et al. 2022, meituan/YOLOv6 v2 layout):

- EfficientRep backbone: a RepVGG stem, four stages of (stride-2 RepVGG block, RepBlock), SimSPPF at the end;
- Rep-PAN neck: top-down (1x1 SimConv reduce, nearest 2x upsample, concat, RepBlock) then bottom-up (stride-2
  SimConv, concat, RepBlock), giving P3 / P4 / P5 at strides 8 / 16 / 32;
- efficient decoupled head, one per level: a 1x1 stem, then a 3x3 conv + 1x1 prediction for classes and another
  for the box (four ltrb distances in stride units, no DFL as in YOLOv6-N). Conv+BN+SiLU in the head, ReLU in the
  RepVGG blocks and SimConvs.

The forward returns the three raw level maps (B, 4 + classes, H, W): box distances first, then class logits. Decoding
and NMS live in `repq.detect` so the exported graph ends at the three head outputs. Differences from YOLOv6: nearest
upsampling instead of its transposed conv (which repq does not quantize), and no DFL.
Width / depth multipliers scale YOLOv6's base channels (64, 128, 256, 512, 1024) / repeats (1, 6, 12, 18, 6) and
neck channels (256, 128, 128, 256, 256, 512) / repeats (12, 12, 12, 12), as in its configs.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor, nn

from repq.models.blocks import FusedConvAct, RepVGGBlock
from repq.models.oabn import OABNConfig
from repq.models.registry import register_model

STRIDES = (8, 16, 32)
_BACKBONE_CHANNELS, _BACKBONE_REPEATS = (64, 128, 256, 512, 1024), (1, 6, 12, 18, 6)
_NECK_CHANNELS, _NECK_REPEATS = (256, 128, 128, 256, 256, 512), (12, 12, 12, 12)


def _make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


class ConvBNAct(nn.Sequential):
    """Conv + BN + activation (`conv`, `bn`, `act`): YOLOv6's SimConv (ReLU) and Conv (SiLU)."""

    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, act: str = "relu",
                 deploy: bool = False):
        super().__init__(OrderedDict(   # deploy: the folded form (BN absorbed into the conv's bias)
            conv=nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=deploy),
            bn=nn.Identity() if deploy else nn.BatchNorm2d(cout),
            act=nn.SiLU() if act == "silu" else nn.ReLU(),
        ))


class RepBlock(nn.Sequential):
    """n RepVGG blocks: the first changes the width (YOLOv6's RepBlock: `conv1`, then `block`)."""

    def __init__(self, cin: int, cout: int, n: int, block):
        super().__init__(OrderedDict(conv1=block(cin, cout, 1),
                                     block=nn.Sequential(*[block(cout, cout, 1) for _ in range(n - 1)])))


class SimSPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max pools, concatenated with their input."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 5, deploy: bool = False):
        super().__init__()
        hidden = cin // 2
        self.cv1 = ConvBNAct(cin, hidden, 1, deploy=deploy)
        self.m = nn.MaxPool2d(kernel_size, 1, kernel_size // 2)
        self.cv2 = ConvBNAct(hidden * 4, cout, 1, deploy=deploy)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class EfficientRepBackbone(nn.Module):
    def __init__(self, in_chans: int, channels: list[int], repeats: list[int], block, deploy: bool = False):
        super().__init__()
        self.stem = block(in_chans, channels[0], 2)
        stages = []
        for i in range(1, 5):
            layers = [block(channels[i - 1], channels[i], 2), RepBlock(channels[i], channels[i], repeats[i], block)]
            if i == 4:
                layers.append(SimSPPF(channels[4], channels[4], deploy=deploy))
            stages.append(nn.Sequential(*layers))
        self.ERBlock_2, self.ERBlock_3, self.ERBlock_4, self.ERBlock_5 = stages

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.ERBlock_2(self.stem(x))
        c3 = self.ERBlock_3(x)
        c4 = self.ERBlock_4(c3)
        return c3, c4, self.ERBlock_5(c4)


class RepPANNeck(nn.Module):
    def __init__(self, ch: list[int], n: int, block, deploy: bool = False):
        super().__init__()   # ch: backbone (0-4) then neck (5-10) channels, indexed as in YOLOv6's RepPANNeck
        self.reduce_layer0 = ConvBNAct(ch[4], ch[5], 1, deploy=deploy)
        self.upsample0 = nn.Upsample(scale_factor=2, mode="nearest")
        self.Rep_p4 = RepBlock(ch[3] + ch[5], ch[5], n, block)
        self.reduce_layer1 = ConvBNAct(ch[5], ch[6], 1, deploy=deploy)
        self.upsample1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.Rep_p3 = RepBlock(ch[2] + ch[6], ch[6], n, block)
        self.downsample2 = ConvBNAct(ch[6], ch[7], 3, 2, deploy=deploy)
        self.Rep_n3 = RepBlock(ch[6] + ch[7], ch[8], n, block)
        self.downsample1 = ConvBNAct(ch[8], ch[9], 3, 2, deploy=deploy)
        self.Rep_n4 = RepBlock(ch[5] + ch[9], ch[10], n, block)

    def forward(self, feats: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        c3, c4, c5 = feats
        fpn_out0 = self.reduce_layer0(c5)
        f_out0 = self.Rep_p4(torch.cat([self.upsample0(fpn_out0), c4], 1))
        fpn_out1 = self.reduce_layer1(f_out0)
        pan_out2 = self.Rep_p3(torch.cat([self.upsample1(fpn_out1), c3], 1))
        pan_out1 = self.Rep_n3(torch.cat([self.downsample2(pan_out2), fpn_out1], 1))
        pan_out0 = self.Rep_n4(torch.cat([self.downsample1(pan_out1), fpn_out0], 1))
        return pan_out2, pan_out1, pan_out0


class DetectHeadLevel(nn.Module):
    def __init__(self, channels: int, num_classes: int, prior_prob: float = 0.01, deploy: bool = False):
        super().__init__()
        self.stem = ConvBNAct(channels, channels, 1, act="silu", deploy=deploy)
        self.cls_conv = ConvBNAct(channels, channels, 3, act="silu", deploy=deploy)
        self.reg_conv = ConvBNAct(channels, channels, 3, act="silu", deploy=deploy)
        self.cls_pred = nn.Conv2d(channels, num_classes, 1)
        self.reg_pred = nn.Conv2d(channels, 4, 1)
        with torch.no_grad():   # YOLOv6's initialization: rare positives, unit box distances
            self.cls_pred.bias.fill_(-math.log((1 - prior_prob) / prior_prob))
            self.cls_pred.weight.zero_()
            self.reg_pred.bias.fill_(1.0)
            self.reg_pred.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return torch.cat([self.reg_pred(self.reg_conv(x)), self.cls_pred(self.cls_conv(x))], 1)


class YOLOv6(nn.Module):
    """`forward(images)` -> (P3, P4, P5) raw maps; `repq.detect.postprocess` turns them into boxes."""

    task = "detect"

    def __init__(self, num_classes: int = 80, in_chans: int = 3, width_multiple: float = 0.25,
                 depth_multiple: float = 0.33, deploy: bool = False, oabn: bool | dict | OABNConfig | None = None):
        super().__init__()
        oabn_config = OABNConfig.parse(oabn)

        def block(cin: int, cout: int, stride: int) -> nn.Module:
            return FusedConvAct(cin, cout, stride, 1) if deploy else RepVGGBlock(cin, cout, stride, oabn=oabn_config)

        if not (0 < width_multiple <= 4 and 0 < depth_multiple <= 4):
            raise ValueError("width_multiple and depth_multiple must be in (0, 4]")
        repeats = [max(round(n * depth_multiple), 1) if n > 1 else n for n in _BACKBONE_REPEATS + _NECK_REPEATS]
        ch = [_make_divisible(c * width_multiple) for c in _BACKBONE_CHANNELS + _NECK_CHANNELS]
        self.num_classes, self.strides = num_classes, STRIDES
        self.backbone = EfficientRepBackbone(in_chans, ch[:5], repeats[:5], block, deploy)
        self.neck = RepPANNeck(ch, repeats[5], block, deploy)
        self.detect = nn.ModuleList([DetectHeadLevel(c, num_classes, deploy=deploy) for c in (ch[6], ch[8], ch[10])])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = self.neck(self.backbone(x))
        return tuple(head(f) for head, f in zip(self.detect, feats))


@register_model
def yolov6_n(**kwargs) -> YOLOv6:
    """YOLOv6-N-like detector (width 0.25, depth 0.33): EfficientRep + Rep-PAN + efficient decoupled head."""
    return YOLOv6(**{"width_multiple": 0.25, "depth_multiple": 0.33, **kwargs})


@register_model
def yolov6_pico(**kwargs) -> YOLOv6:
    """A smaller YOLOv6-style detector (width 0.125, depth 0.17) for CPU-sized experiments."""
    return YOLOv6(**{"width_multiple": 0.125, "depth_multiple": 0.17, **kwargs})


yolov6_n.task = yolov6_pico.task = YOLOv6.task   # is_detector reads it from a checkpoint's model name


def is_detector(model_or_config) -> bool:
    """True for a detector module, or for a checkpoint's model config naming a registered detector."""
    if isinstance(model_or_config, dict):   # the registered factory says what it builds (its `task`)
        from repq.models.registry import _REGISTRY
        return getattr(_REGISTRY.get(str(model_or_config.get("name"))), "task", None) == "detect"
    return getattr(model_or_config, "task", None) == "detect"

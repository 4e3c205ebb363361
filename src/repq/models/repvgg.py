"""The RepVGG family (Ding et al. 2021; layout of DingXiaoH/RepVGG), with a stride-1 stem option for small inputs."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import Tensor, nn

from repq.models.blocks import FusedConvAct, RepVGGBlock
from repq.models.oabn import OABNConfig
from repq.models.registry import register_model


@dataclass(frozen=True)
class RepVGGSpec:
    depths: tuple[int, int, int, int]
    width_a: float
    width_b: float
    group_every_other: int = 1  # g2/g4 variants: groups on blocks 2, 4, ..., 26 (counted from 1 in stage 1)
    use_se: bool = False        # D2se: an SE block in every block, after the branch sum


class RepVGG(nn.Module):
    def __init__(self, spec: RepVGGSpec, num_classes: int = 1000, in_chans: int = 3, small_input: bool = False,
                 width_scale: float = 1.0, deploy: bool = False, oabn: bool | dict | OABNConfig | None = None):
        super().__init__()
        widths = [int(64 * spec.width_a * width_scale), int(128 * spec.width_a * width_scale),
                  int(256 * spec.width_a * width_scale), int(512 * spec.width_b * width_scale)]
        if min(widths) < 1:
            raise ValueError(f"width_scale={width_scale} leaves a stage with no channels")
        stem_width = min(int(64 * width_scale), widths[0])
        oabn_config = OABNConfig.parse(oabn)  # validated even for deploy=True (a fused OABN model's config)

        def block(cin: int, cout: int, stride: int, groups: int = 1) -> nn.Module:
            if deploy:
                return FusedConvAct(cin, cout, stride, groups, use_se=spec.use_se)
            return RepVGGBlock(cin, cout, stride, groups, oabn=oabn_config, use_se=spec.use_se)

        self.stage0 = block(in_chans, stem_width, 1 if small_input else 2)
        cin, layer_idx = stem_width, 1
        for stage_idx, (depth, width) in enumerate(zip(spec.depths, widths), start=1):
            blocks = []
            for i in range(depth):
                groups = spec.group_every_other if layer_idx % 2 == 0 else 1
                blocks.append(block(cin, width, 2 if i == 0 else 1, groups))
                cin, layer_idx = width, layer_idx + 1
            setattr(self, f"stage{stage_idx}", nn.Sequential(*blocks))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage0(x)
        x = self.stage4(self.stage3(self.stage2(self.stage1(x))))
        return self.linear(self.gap(x).flatten(1))


_A, _B, _D = (2, 4, 14, 1), (4, 6, 16, 1), (8, 14, 24, 1)
SPECS: dict[str, RepVGGSpec] = {
    "repvgg_a0": RepVGGSpec(_A, 0.75, 2.5), "repvgg_a1": RepVGGSpec(_A, 1.0, 2.5),
    "repvgg_a2": RepVGGSpec(_A, 1.5, 2.75), "repvgg_b0": RepVGGSpec(_B, 1.0, 2.5),
    "repvgg_b1": RepVGGSpec(_B, 2.0, 4.0), "repvgg_b1g2": RepVGGSpec(_B, 2.0, 4.0, 2),
    "repvgg_b1g4": RepVGGSpec(_B, 2.0, 4.0, 4), "repvgg_b2": RepVGGSpec(_B, 2.5, 5.0),
    "repvgg_b2g2": RepVGGSpec(_B, 2.5, 5.0, 2), "repvgg_b2g4": RepVGGSpec(_B, 2.5, 5.0, 4),
    "repvgg_b3": RepVGGSpec(_B, 3.0, 5.0), "repvgg_b3g2": RepVGGSpec(_B, 3.0, 5.0, 2),
    "repvgg_b3g4": RepVGGSpec(_B, 3.0, 5.0, 4),
    "repvgg_d2se": RepVGGSpec(_D, 2.5, 5.0, use_se=True),
}


def _factory(name: str):
    def build(**kwargs) -> RepVGG:
        return RepVGG(SPECS[name], **kwargs)
    build.__name__ = name
    signature = inspect.signature(RepVGG.__init__)
    build.__signature__ = signature.replace(parameters=[p for n, p in signature.parameters.items()
                                                        if n not in ("self", "spec")])
    build.__doc__ = f"RepVGG {name.split('_')[1].upper()} (width_scale < 1 gives a thinner net for small data)."
    return build


for _name in SPECS:
    register_model(_factory(_name))

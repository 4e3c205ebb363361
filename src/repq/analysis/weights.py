"""Weight statistics of fused kxk convs: the center taps collect the 1x1 and identity branches, so their spread
dwarfs that of the surrounding taps; that ratio is what a min-max scale pays for."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerWeightStats:
    name: str
    center_absmax: float
    surround_absmax: float
    center_std: float
    surround_std: float

    @property
    def ratio(self) -> float:
        """max|center| / max|surround|: > 1 means the center taps set a per-tensor min-max scale."""
        return self.center_absmax / self.surround_absmax if self.surround_absmax > 0 else float("inf")


@torch.no_grad()
def center_surround_stats(model: nn.Module) -> list[LayerWeightStats]:
    """Per fused k x k conv (k >= 3, odd): magnitude of the center taps vs the surrounding taps."""
    stats = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or module.kernel_size[0] < 3 or module.kernel_size[0] % 2 == 0:
            continue
        w = module.weight.detach()
        c = w.shape[-1] // 2
        mask = torch.ones(w.shape[-2:], dtype=torch.bool)
        mask[c, c] = False
        center, surround = w[:, :, c, c], w[:, :, mask]
        stats.append(LayerWeightStats(name, float(center.abs().max()), float(surround.abs().max()),
                                      float(center.std()), float(surround.std())))
    return stats

"""Weight statistics that explain why a fused kernel is hard to quantize.

The center taps of a fused kxk conv collect the 1x1 and identity branches, so their spread can dwarf that of the
surrounding taps; `branch_contributions` says which original branch put them there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from repq.reparam.fold import bn_scale


@dataclass
class LayerWeightStats:
    name: str
    center_absmax: float
    surround_absmax: float
    center_std: float
    surround_std: float
    channel_max_ratio: float   # max over output channels of max|w| / median over channels of max|w|
    kurtosis: float            # excess kurtosis of all weights (0 for a Gaussian)

    @property
    def ratio(self) -> float:
        """max|center| / max|surround|: > 1 means the center taps set a per-tensor min-max scale."""
        return self.center_absmax / self.surround_absmax if self.surround_absmax > 0 else float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "center_surround_ratio": self.ratio}


@dataclass
class BranchContribution:
    """max |contribution| of each branch of a training-time block to the fused center taps, and folded BN scales."""
    layer: str                 # the fused conv this block becomes
    dense_center: float        # t3 K3[:, :, c, c]
    one_by_one: float          # t1 K1
    identity: float            # t0 (on the diagonal), 0 without an identity branch
    t3_max: float
    t1_max: float
    # channels of a branch that reads a single input channel (the identity BN, or a depthwise 1x1 branch's BN) whose
    # running variance is below the BN's eps: that input was (nearly) constant in training, typically a channel the
    # previous ReLU never lets through. Their scale gamma / sqrt(var + eps) can reach gamma / sqrt(eps) (316 gamma at
    # eps 1e-5): the fused weight multiplies a constant, so the float model does not care, but it sets the
    # quantization range of its output channel (or of the whole tensor).
    constant_inputs: int = 0

    @property
    def dominant(self) -> str:
        values = {"3x3": self.dense_center, "1x1": self.one_by_one, "identity": self.identity}
        return max(values, key=values.get)


def _kurtosis(w: torch.Tensor) -> float:
    w = w.double().flatten()
    centered = w - w.mean()
    var = centered.pow(2).mean()
    return float(centered.pow(4).mean() / var.pow(2) - 3.0) if var > 0 else 0.0


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
        channel_max = w.abs().reshape(w.shape[0], -1).amax(dim=1)
        median = float(channel_max.median())
        stats.append(LayerWeightStats(name, float(center.abs().max()), float(surround.abs().max()),
                                      float(center.std()), float(surround.std()),
                                      float(channel_max.max()) / median if median > 0 else float("inf"),
                                      _kurtosis(w)))
    return stats


def _constant_channels(bn: nn.BatchNorm2d | None) -> int:
    return int((bn.running_var < bn.eps).sum()) if bn is not None else 0


@torch.no_grad()
def branch_contributions(model: nn.Module) -> list[BranchContribution]:
    """For every training-time RepVGG block and k x k MobileOne block: what each branch adds to the fused center
    taps ("1x1" is MobileOne's scale branch, "3x3" the sum of its k x k branches)."""
    from repq.models.blocks import RepVGGBlock
    from repq.models.mobileone import MobileOneBlock

    out = []
    for name, block in model.named_modules():
        if isinstance(block, RepVGGBlock):
            (k3, _), (k1, _) = block.rbr_dense.folded(), block.rbr_1x1.folded()
            identity = block.rbr_identity
            t0 = bn_scale(identity).abs().max() if identity is not None else torch.tensor(0.0)
            out.append(BranchContribution(f"{name}.rbr_reparam", float(k3[:, :, 1, 1].abs().max()),
                                          float(k1.abs().max()), float(t0),
                                          float(bn_scale(block.rbr_dense.bn).abs().max()),
                                          float(bn_scale(block.rbr_1x1.bn).abs().max()), _constant_channels(identity)))
        elif isinstance(block, MobileOneBlock) and block.rbr_scale is not None:
            kk = sum(branch.folded()[0] for branch in block.rbr_conv)
            c = kk.shape[-1] // 2
            (k1, _), skip = block.rbr_scale.folded(), block.rbr_skip
            t0 = bn_scale(skip).abs().max() if skip is not None else torch.tensor(0.0)
            scale_conv = block.rbr_scale.conv
            depthwise = scale_conv.groups == scale_conv.in_channels == scale_conv.out_channels
            constant = _constant_channels(skip) + (_constant_channels(block.rbr_scale.bn) if depthwise else 0)
            out.append(BranchContribution(f"{name}.conv", float(kk[:, :, c, c].abs().max()), float(k1.abs().max()),
                                          float(t0), max(float(bn_scale(b.bn).abs().max()) for b in block.rbr_conv),
                                          float(bn_scale(block.rbr_scale.bn).abs().max()), constant))
    return out

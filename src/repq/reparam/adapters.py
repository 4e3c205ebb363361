"""Block adapters: fuse the re-parameterizable blocks users already have, whatever their attribute names.

A layout says which attributes of a block hold its k x k conv+BN branches, its 1x1 branches, its identity
branch, an optional average-pool branch (YOLOv6 QARepVGGBlockV2), an optional BN after the sum (QARepVGG) and the
modules that follow (SE/attention, activation). Every layout is fused by the same code: fold each branch, merge,
fold the post-sum BN. A layout is used only when it accounts for every sub-module of the block that holds state
(`unaccounted`); the fused block is then verified against the original (reparam/verify.py).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from repq.reparam.fold import bn_scale, fold_bn, identity_kernel, merge_branches


@dataclass(frozen=True)
class BlockLayout:
    name: str
    kxk: str                        # conv+BN branch, or a ModuleList of them (MobileOne)
    one_by_one: str                 # 1x1 conv+BN branch (or a plain 1x1 conv, QARepVGG), may be None on the block
    identity: str                   # BN (or nn.Identity, QARepVGG) on the input, may be None on the block
    post: tuple[str, ...]           # modules after the sum, kept as they are (absent ones are skipped)
    post_norm: str | None = None    # BN after the branch sum (QARepVGG)
    kxk_is_list: bool = False
    avg: str | None = None          # k x k average-pool branch (QARepVGGBlockV2), may be None on the block

    def attributes(self) -> set[str]:
        return {self.kxk, self.one_by_one, self.identity, *self.post,
                *(a for a in (self.post_norm, self.avg) if a is not None)}


LAYOUTS: tuple[BlockLayout, ...] = (
    BlockLayout("yolov6_qarepvgg", "rbr_dense", "rbr_1x1", "rbr_identity", ("se", "nonlinearity"), post_norm="bn",
                avg="rbr_avg"),
    BlockLayout("original_repvgg", "rbr_dense", "rbr_1x1", "rbr_identity", ("se", "nonlinearity")),
    BlockLayout("timm_mobileone", "conv_kxk", "conv_scale", "identity", ("se", "attn", "act"), kxk_is_list=True),
    BlockLayout("timm_repvgg", "conv_kxk", "conv_1x1", "identity", ("attn", "act")),
    BlockLayout("mobileone", "rbr_conv", "rbr_scale", "rbr_skip", ("se", "activation"), kxk_is_list=True),
    BlockLayout("mmpretrain_repvgg", "branch_3x3", "branch_1x1", "branch_norm", ("se_layer", "act")),
)


def _norm_of(m: nn.Module) -> nn.BatchNorm2d | None:
    """The BN of a conv+BN branch, named `bn` (most code) or `norm` (OpenMMLab)."""
    for name in ("bn", "norm"):
        if isinstance(getattr(m, name, None), nn.BatchNorm2d):
            return getattr(m, name)
    return None


def _is_conv_bn(m: nn.Module) -> bool:
    return isinstance(getattr(m, "conv", None), nn.Conv2d) and _norm_of(m) is not None


LAYOUT_BY_NAME = {layout.name: layout for layout in LAYOUTS}


def _kxk_branches(module: nn.Module, layout: BlockLayout) -> list[nn.Module]:
    kxk = getattr(module, layout.kxk, None)
    if kxk is None or layout.kxk_is_list != isinstance(kxk, nn.ModuleList):
        return []
    return list(kxk) if layout.kxk_is_list else [kxk]


def _has_state(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def unaccounted(module: nn.Module, layout: BlockLayout) -> tuple[list[str], list[str]]:
    """Sub-modules of `module` that `layout` does not name: (those holding parameters or buffers, which repq
    would drop, so the layout must not be used; stateless ones, e.g. drop_path, which verification judges)."""
    known = layout.attributes()
    extra = [(name, child) for name, child in module.named_children() if name not in known]
    return ([n for n, c in extra if _has_state(c)],
            [n for n, c in extra if not _has_state(c) and not isinstance(c, (nn.Identity, nn.Dropout))])


def _avg_branch(module: nn.Module, layout: BlockLayout) -> nn.AvgPool2d | None:
    return getattr(module, layout.avg, None) if layout.avg else None


def match_layout(module: nn.Module) -> BlockLayout | None:
    """The first layout whose branches this module has (in training form: no fused conv yet)."""
    for layout in LAYOUTS:
        branches = _kxk_branches(module, layout)
        if not branches or not all(_is_conv_bn(b) for b in branches):
            continue
        if layout.post_norm is not None:
            if not isinstance(getattr(module, layout.post_norm, None), nn.BatchNorm2d):
                continue
            # YOLOv6 applies the post-sum BN after `se`: it folds into the conv only when `se` does nothing
            if any(not isinstance(getattr(module, name, None), (nn.Identity, type(None))) for name in layout.post[:-1]):
                continue
        if layout.post_norm is None and isinstance(getattr(module, layout.one_by_one, None), nn.Conv2d):
            continue  # a bare 1x1 conv without a post-sum BN is not a layout we know
        if not hasattr(module, layout.identity) and not hasattr(module, layout.one_by_one):
            continue
        avg = _avg_branch(module, layout)
        if avg is not None and not _foldable_avg(avg, branches[0].conv):
            continue
        return layout
    return None


def _foldable_avg(avg: nn.Module, geometry: nn.Conv2d) -> bool:
    """An average pool equal to a k x k conv on the kxk branch's grid: zero padding counted, no divisor override."""
    k = geometry.kernel_size[0]
    as_pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return isinstance(avg, nn.AvgPool2d) and as_pair(avg.kernel_size) == (k, k) and \
        as_pair(avg.stride) == tuple(geometry.stride) and as_pair(avg.padding) == tuple(geometry.padding) and \
        avg.count_include_pad and avg.divisor_override is None and not avg.ceil_mode and \
        geometry.in_channels == geometry.out_channels and tuple(geometry.dilation) == (1, 1)


def _fold_with_bias(weight: Tensor, bias: Tensor | None, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """BN(W * x + b) = (t W) * x + (beta - t mu + t b)."""
    folded_w, folded_b = fold_bn(weight, bn)
    return folded_w, folded_b if bias is None else folded_b + bn_scale(bn) * bias


def _folded(branch: nn.Module) -> tuple[Tensor, Tensor]:
    if isinstance(branch, nn.Conv2d):
        bias = branch.bias if branch.bias is not None else torch.zeros(branch.out_channels, device=branch.weight.device)
        return branch.weight, bias
    return _fold_with_bias(branch.conv.weight, branch.conv.bias, _norm_of(branch))


@torch.no_grad()
def merge_block(block: nn.Module, layout: BlockLayout) -> tuple[Tensor, Tensor]:
    """The (weight, bias) of the single conv equal to the block's branch sum (and post-sum BN)."""
    kxk_branches = _kxk_branches(block, layout)
    geometry = kxk_branches[0].conv
    k = geometry.kernel_size[0]
    branches = [_folded(b) for b in kxk_branches]
    one = getattr(block, layout.one_by_one, None)
    if one is not None:
        branches.append(_folded(one))
    ident = getattr(block, layout.identity, None)
    if ident is not None:
        eye = identity_kernel(geometry.in_channels, geometry.groups, k, like=geometry.weight)
        if isinstance(ident, nn.BatchNorm2d):
            branches.append(fold_bn(eye, ident))
        else:
            branches.append((eye, torch.zeros(geometry.out_channels, device=eye.device)))
    if _avg_branch(block, layout) is not None:   # mean over the k x k window of the same channel
        avg = identity_kernel(geometry.in_channels, geometry.groups, k, like=geometry.weight).sum((2, 3), keepdim=True)
        branches.append((avg.expand(-1, -1, k, k) / (k * k), torch.zeros(geometry.out_channels, device=avg.device)))
    weight, bias = merge_branches(branches, k)
    if layout.post_norm is not None:
        weight, bias = _fold_with_bias(weight, bias, getattr(block, layout.post_norm))
    return weight, bias


@torch.no_grad()
def fuse_block(block: nn.Module, layout: BlockLayout) -> nn.Sequential:
    """One conv (with the geometry of the k x k branch) followed by the block's post modules."""
    weight, bias = merge_block(block, layout)
    geometry = _kxk_branches(block, layout)[0].conv
    k = geometry.kernel_size[0]
    conv = nn.Conv2d(geometry.in_channels, geometry.out_channels, k, geometry.stride, geometry.padding,
                     geometry.dilation, geometry.groups, bias=True).to(weight.device)
    conv.weight.copy_(weight)
    conv.bias.copy_(bias)
    post = [(name, getattr(block, name)) for name in layout.post if isinstance(getattr(block, name, None), nn.Module)]
    return nn.Sequential(OrderedDict([("conv", conv), *post]))

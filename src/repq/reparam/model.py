"""Model-level re-parameterization: swap every multi-branch block for its plain-conv form.

A module with a `fuse()` method (repq's protocol, as in timm's `reparameterize_model`) returns its replacement;
other blocks are fused through the layout adapters (original RepVGG, YOLOv6, timm, MobileOne). The input model
is never modified.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from repq.errors import RepqError
from repq.reparam.adapters import fuse_block, match_layout


def _replace_fusable(module: nn.Module, prefix: str = "") -> list[tuple[str, str, nn.Module, nn.Module]]:
    """Replace fusable children in place; return (name, layout, original block, replacement) for each."""
    replaced = []
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        fuse = getattr(child, "fuse", None)
        layout = None if callable(fuse) else match_layout(child)
        if callable(fuse) or layout is not None:
            new = fuse() if callable(fuse) else fuse_block(child, layout)
            setattr(module, name, new)
            replaced.append((path, "repq" if callable(fuse) else layout.name, child, new))
        else:
            replaced += _replace_fusable(child, path + ".")
    return replaced


def _fuse_copy(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str, nn.Module, nn.Module]]]:
    for name, tensor in list(model.state_dict().items()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RepqError(f"model has NaN/Inf values in '{name}'; retrain or load a valid checkpoint")
    fused = copy.deepcopy(model).eval()
    replaced = _replace_fusable(fused)
    config = getattr(fused, "repq_config", None)
    if isinstance(config, dict):
        fused.repq_config = {**config, "deploy": True}
    return fused, replaced


@torch.no_grad()
def reparameterize(model: nn.Module) -> nn.Module:
    """Return a new eval-mode model in which every multi-branch block is one plain conv (+ its activation)."""
    return _fuse_copy(model)[0]


@torch.no_grad()
def fuse_blocks(model: nn.Module, verify: bool = True, size: int = 16,
                seed: int = 0) -> tuple[nn.Module, list[dict[str, Any]]]:
    """`reparameterize` plus a report: each fused block, its layout and, with `verify`, the max |difference|
    between the block and its fused form on a random input (size x size)."""
    fused, replaced = _fuse_copy(model)
    gen = torch.Generator().manual_seed(seed)
    report = []
    for name, layout, block, new in replaced:
        if not verify:
            report.append({"block": name, "layout": layout})
            continue
        conv = next(m for m in new.modules() if isinstance(m, nn.Conv2d))
        x = torch.randn(2, conv.in_channels, size, size, generator=gen).to(conv.weight.device)
        ref = block.eval()(x)
        diff = float((new(x) - ref).abs().max())
        report.append({"block": name, "layout": layout, "max_abs_diff": diff,
                       "relative_diff": diff / max(1.0, float(ref.abs().max()))})
    return fused, report

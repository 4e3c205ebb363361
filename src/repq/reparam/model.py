"""Model-level re-parameterization: swap every block that knows how to fuse itself for its plain-conv form.

Protocol (as in timm's `reparameterize_model`): a module with a `fuse()` method returns the inference module that
replaces it. The input model is never modified.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from repq.errors import RepqError


def _replace_fusable(module: nn.Module) -> int:
    count = 0
    for name, child in list(module.named_children()):
        fuse = getattr(child, "fuse", None)
        if callable(fuse):
            setattr(module, name, fuse())
            count += 1
        else:
            count += _replace_fusable(child)
    return count


@torch.no_grad()
def reparameterize(model: nn.Module) -> nn.Module:
    """Return a new eval-mode model in which every multi-branch block is one plain conv (+ its activation)."""
    for name, tensor in list(model.state_dict().items()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RepqError(f"model has NaN/Inf values in '{name}'; retrain or load a valid checkpoint")
    fused = copy.deepcopy(model).eval()
    _replace_fusable(fused)
    config = getattr(fused, "repq_config", None)
    if isinstance(config, dict):
        fused.repq_config = {**config, "deploy": True}
    return fused

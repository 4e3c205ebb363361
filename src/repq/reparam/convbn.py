"""Generic conv+BN folding: every Conv2d whose output goes only into a BatchNorm2d (directly or through
nn.Identity / nn.Dropout) absorbs that BN, found in the torch.fx graph (as fx-based fusers do), so ConvModule /
ConvBNAct stems, necks and heads quantize whatever their attribute names. Where a module cannot be traced (data-
dependent control flow), its children are traced one by one. The BN is replaced by nn.Identity in place.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx
from torch import nn

from repq.reparam.fold import bn_scale

_PASS_THROUGH = (nn.Identity, nn.Dropout)


def _is_foldable_bn(m: nn.Module) -> bool:
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and m.track_running_stats \
        and m.running_mean is not None


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.Module) -> None:
    """BN(conv(x)) = conv'(x) with W' = t W, b' = beta + t (b - mu)."""
    t = bn_scale(bn)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(t)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(t)
    new_bias = beta + t * (bias - bn.running_mean)
    conv.weight.mul_(t.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_bias)


def _producer(node: torch.fx.Node, modules: dict[str, nn.Module]) -> torch.fx.Node | None:
    """The node feeding `node`'s first argument, skipping pass-through modules used only there."""
    src = node.args[0] if node.args else None
    while isinstance(src, torch.fx.Node) and src.op == "call_module" and \
            isinstance(modules.get(src.target), _PASS_THROUGH) and len(src.users) == 1:
        src = src.args[0] if src.args else None
    return src if isinstance(src, torch.fx.Node) else None


def _set(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def fold_conv_bn(module: nn.Module, prefix: str = "") -> list[dict[str, str]]:
    """Fold every conv -> BN pair of `module` in place; returns {"conv", "bn"} names (relative to the top)."""
    try:
        graph = torch.fx.Tracer().trace(module)
    except Exception:  # noqa: BLE001 - fx raises many types; trace the children instead
        folded = []
        for name, child in module.named_children():
            folded += fold_conv_bn(child, f"{prefix}{name}.")
        return folded
    modules = dict(module.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    read = [n.target for n in graph.nodes if n.op == "get_attr"]   # parameters used outside the module call

    def used_elsewhere(name: str) -> bool:
        return any(t.startswith(name + ".") for t in read)

    folded = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_foldable_bn(modules.get(node.target)) or calls[node.target] != 1:
            continue
        src = _producer(node, modules)
        if src is None or src.op != "call_module" or len(src.users) != 1 or calls[src.target] != 1:
            continue
        conv, bn = modules.get(src.target), modules[node.target]
        if type(conv) is not nn.Conv2d or conv.out_channels != bn.num_features or \
                used_elsewhere(src.target) or used_elsewhere(node.target):
            continue
        _fold_into(conv, bn)
        _set(module, node.target, nn.Identity())
        folded.append({"conv": prefix + src.target, "bn": prefix + node.target})
    return folded

"""Model-level re-parameterization: swap every multi-branch block for its plain-conv form, fold every remaining
conv+BN pair, and verify the result against the original.

How a block is fused, in order (timm's `reparameterize_model` idea, plus verification):
1. a `fuse()` method (repq's protocol) returns its replacement;
2. a known layout (reparam/adapters.py) that accounts for every sub-module holding state;
3. the block's own in-place deploy method (`reparameterize`, `switch_to_deploy`, as timm, YOLOv6 and the original
   RepVGG code define them), when a layout matches only in part or not at all;
4. a layout that leaves stateful sub-modules unaccounted and no own method: a one-line error naming them.
Then every Conv2d -> BatchNorm2d pair left in the graph is folded (reparam/convbn.py), and each fused block and
the whole network are compared with the original on real inputs (reparam/verify.py). The input model is never
modified.
"""
from __future__ import annotations

import copy
import inspect
import time
from typing import Any

import torch
from torch import Tensor, nn

from repq.errors import RepqError
from repq.reparam.adapters import fuse_block, match_layout, unaccounted
from repq.reparam.convbn import fold_conv_bn
from repq.reparam.verify import verify_fusion

OWN_METHODS = ("reparameterize", "switch_to_deploy")   # in place, as timm / YOLOv6 / the original RepVGG


def _own_method(module: nn.Module) -> str | None:
    """The block's in-place deploy method: one of OWN_METHODS callable without arguments (a VAE's
    `reparameterize(mu, logvar)` is not one)."""
    for name in OWN_METHODS:
        method = getattr(module, name, None)
        if callable(method):
            try:
                params = inspect.signature(method).parameters.values()
            except (TypeError, ValueError):
                continue
            if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
                return name
    return None


def _replace_fusable(module: nn.Module, prefix: str = "") -> list[dict[str, Any]]:
    """Fuse the re-parameterizable blocks under `module` in place; one record per block fused."""
    replaced = []
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        record = {"block": path, "class": type(child).__name__}
        fuse = getattr(child, "fuse", None)
        layout = None if callable(fuse) else match_layout(child)
        stateful, stateless = unaccounted(child, layout) if layout is not None else ([], [])
        own = _own_method(child)
        if callable(fuse):
            new = fuse()
            setattr(module, name, new if isinstance(new, nn.Module) else child)
            replaced.append({**record, "layout": "fuse()"})
        elif layout is not None and not stateful and (not stateless or own is None):
            setattr(module, name, fuse_block(child, layout))   # stateless extras: verification judges them
            replaced.append({**record, "layout": layout.name, "unaccounted": stateless})
        elif own is not None and (layout is not None or not _is_deploy_form(child)):
            before = set(child.state_dict())
            try:
                getattr(child, own)()
            except Exception as exc:  # noqa: BLE001 - third-party code: report which block failed
                raise RepqError(f"block '{path}' ({type(child).__name__}): its own {own}() failed "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
            if set(child.state_dict()) != before:
                replaced.append({**record, "layout": f"{own}()", "unaccounted": stateful + stateless})
        elif layout is not None:
            raise RepqError(f"block '{path}' ({type(child).__name__}) looks like {layout.name} but has sub-modules "
                            f"repq does not know: {', '.join(stateful)}; repq will not drop them (give the block a "
                            "fuse() method that returns its deploy form)")
        else:
            replaced += _replace_fusable(child, path + ".")
    return replaced


def _is_deploy_form(module: nn.Module) -> bool:
    """An own-method block already in deploy form (YOLOv6 / RepVGG keep `rbr_reparam` and set `deploy`)."""
    return getattr(module, "deploy", False) is True or hasattr(module, "rbr_reparam")


def _fuse_copy(model: nn.Module) -> tuple[nn.Module, list[dict[str, Any]], list[dict[str, str]]]:
    for name, tensor in list(model.state_dict().items()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RepqError(f"model has NaN/Inf values in '{name}'; retrain or load a valid checkpoint")
    fused = copy.deepcopy(model).eval()
    with torch.no_grad():
        replaced = _replace_fusable(fused)
        folds = fold_conv_bn(fused)
    config = getattr(fused, "repq_config", None)
    if isinstance(config, dict):
        fused.repq_config = {**config, "deploy": True}
    return fused, replaced, folds


def reparameterize(model: nn.Module, example_input: Tensor | None = None) -> nn.Module:
    """Return a new eval-mode model in which every multi-branch block is one plain conv (+ its activation) and
    every conv+BN pair is one conv, verified against `model` (on `example_input`, else on two random images)."""
    return fuse_blocks(model, example_input=example_input)[0]


def fuse_blocks(model: nn.Module, verify: bool = True, example_input: Tensor | None = None
                ) -> tuple[nn.Module, list[dict[str, Any]]]:
    """`reparameterize` plus a report: one record per fused block ("block", "class", "layout", "unaccounted",
    "relative_diff" with `verify`), one per folded conv+BN ("conv", "bn") and, with `verify`, one for the whole
    network ("network", "relative_diff", "dtype", "seconds"). Raises RepqError on any mismatch."""
    fused, replaced, folds = _fuse_copy(model)
    report: list[dict[str, Any]] = [*replaced, *folds]
    if verify and (replaced or folds):
        start = time.perf_counter()
        network = verify_fusion(model, fused, replaced, example_input)
        network[0]["seconds"] = time.perf_counter() - start
        report += network
    return fused, report


def fused_blocks(report: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The block records of a `fuse_blocks` report."""
    return [r for r in report if "layout" in r]

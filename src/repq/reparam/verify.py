"""Check a fused model against its original: every replaced block on the inputs it really receives, then the
whole network, in float64 where the model allows it.

A block is called with the arguments it got during a forward pass of the original model (captured by hooks), so
blocks with any call signature (RepVGGplus's `(x, L2)`) are checked, and a fused form that only matches on
random inputs of the wrong shape cannot pass.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from repq.errors import RepqError

# relative tolerances (max |difference| / max |reference|): float64 evaluation of float32 weights, and float32
TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4}


def tensors_of(output: Any) -> list[Tensor]:
    """The tensors of a module's output (a tensor, or a tuple / list / dict of them, nested), in order; other
    values (None, Python numbers) are skipped."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors_of(item)]
    return []


def relative_difference(reference: Any, candidate: Any) -> float:
    """max |candidate - reference| / max |reference| over the outputs both give as tensors of equal shape; the
    first tensor (the main output) must be present in both. inf where it is not."""
    ref, out = tensors_of(reference), tensors_of(candidate)
    if not ref or not out or ref[0].shape != out[0].shape:
        return float("inf")
    pairs = [(a, b) for a, b in zip(ref, out) if a.shape == b.shape and a.is_floating_point()]
    diff = max(float((b.double() - a.double()).abs().max()) if a.numel() else 0.0 for a, b in pairs)
    scale = max(float(a.double().abs().max()) if a.numel() else 0.0 for a, _ in pairs)
    if diff != diff:  # NaN
        return float("inf")
    return diff / max(scale, 1e-12)


def _to(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, dtype) for k, v in value.items()}
    return value


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_inputs(model: nn.Module, names: list[str], example: Tensor) -> dict[str, tuple[tuple, dict]]:
    """Run `model` on `example`; return the (args, kwargs) of the first call of each named submodule."""
    captured: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name in names:
        def hook(module, args, kwargs, name=name):
            captured.setdefault(name, (_clone(args), _clone(kwargs)))
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return captured


def guess_example(model: nn.Module, size: int = 32, seed: int = 0) -> Tensor:
    """Two random images with the channel count of the model's first conv (repq models record theirs)."""
    config = getattr(model, "repq_config", None)
    channels = config.get("in_chans") if isinstance(config, dict) else None
    if not channels:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise RepqError("cannot verify the fusion: the model has no Conv2d to infer its input from; pass an "
                            "example input")
        channels = first.in_channels
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, size, size, generator=gen).to(device)


def _double_copies(original: nn.Module, fused: nn.Module, example: Tensor):
    """float64 copies of both models and the example when the models run in float64, else float32 copies."""
    for dtype in (torch.float64, torch.float32):
        ref, new = copy.deepcopy(original).eval().to(dtype), copy.deepcopy(fused).eval().to(dtype)
        x = example.to(dtype)
        try:
            with torch.no_grad():
                ref(x)
            return ref, new, x, dtype
        except RuntimeError:
            if dtype == torch.float32:
                raise
    raise AssertionError("unreachable")


@torch.no_grad()
def verify_fusion(original: nn.Module, fused: nn.Module, replaced: list[dict[str, Any]],
                  example: Tensor | None = None) -> list[dict[str, Any]]:
    """Compare each replaced block (dicts with "block", "layout", "unaccounted") and then the whole network with
    the original; fills in "relative_diff" and returns the whole-network record. Raises a one-line RepqError naming
    the first block (or the network) that does not match."""
    example = guess_example(original) if example is None else example
    try:
        ref, new, x, dtype = _double_copies(original, fused, example)
        inputs = capture_inputs(ref, [r["block"] for r in replaced], x)
    except RepqError:
        raise
    except Exception as exc:
        shape = "x".join(str(s) for s in example.shape)
        raise RepqError(f"cannot verify the fusion: the original model does not run on a {shape} input "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); pass an example "
                        "input of the right shape") from None
    tol = TOLERANCE[dtype]
    for record in replaced:
        name = record["block"]
        if name not in inputs:   # a block the forward pass never reaches cannot be checked on real inputs
            record["relative_diff"] = None
            continue
        args, kwargs = inputs[name]
        block_ref, block_new = ref.get_submodule(name), new.get_submodule(name)
        try:
            out_ref, out_new = block_ref(*args, **kwargs), block_new(*args, **kwargs)
            rel = relative_difference(out_ref, out_new)
        except Exception as exc:
            raise RepqError(f"fused block '{name}' ({record['class']}) cannot be called like the original "
                            f"({type(exc).__name__}); repq cannot fuse this block type") from None
        record["relative_diff"] = rel
        if not rel <= tol:
            missing = ", ".join(record.get("unaccounted") or []) or "none"
            raise RepqError(f"fusion of '{name}' ({record['class']}, {record['layout']}) does not match the "
                            f"block: relative difference {rel:.3g} > {tol:g}; attributes repq did not account "
                            f"for: {missing}")
    rel = relative_difference(ref(x), new(x))
    if not rel <= tol:
        raise RepqError(f"the fused model differs from the original by {rel:.3g} (relative) although each fused "
                        "block matches: a conv+BN fold or a block's own deploy method changed something else")
    return [{"network": True, "relative_diff": rel, "dtype": str(dtype).removeprefix("torch.")}]

"""repq checkpoints: model name + arguments, state, and (for quantized models) every scale and option used.

Files are written atomically (temp file + rename) and read with `torch.load(weights_only=True)`, which only
rebuilds tensors and plain containers: loading never runs code from the file.
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repq.errors import RepqError
from repq.io import atomic_write, input_file_problem
from repq.models.registry import create_model

FORMAT = "repq-checkpoint"
VERSION = 1


def _describe(config: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={v}" for k, v in sorted(config.items()) if k not in ("name", "deploy"))
    return f"{config.get('name', '?')}({args})"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through `atomic_write`: a crash never leaves a half-written checkpoint."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> None:
    """Write `model` (built by create_model, possibly fused or quantized) with its config and `extra` entries."""
    config = getattr(model, "repq_config", None)
    if not isinstance(config, dict):
        raise RepqError("only models built by repq.create_model can be saved as repq checkpoints")
    if hasattr(model, "repq_qat"):
        raise RepqError("this is a model being trained by QAT; save repq.convert_qat(model), its deploy form")
    quant = getattr(model, "repq_quant", None)
    kind = "quantized" if quant else ("fused" if config.get("deploy") else "train")
    payload = {"format": FORMAT, "version": VERSION, "kind": kind, "model": dict(config),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "quant": quant, **extra}
    atomic_save(payload, path)


def safe_torch_load(path: str | os.PathLike, missing_hint: str) -> Any:
    """torch.load(weights_only=True): tensors and plain containers only; one-line errors for missing files,
    files that would need to run code, and files that are not torch files at all."""
    problem = input_file_problem(path)
    if problem:
        raise RepqError(f"the checkpoint path {problem}; {missing_hint}" if problem == "is empty"
                        else f"{path} {problem}; {missing_hint}")
    path = Path(path)
    try:
        with warnings.catch_warnings():   # torch's own pickle warnings would precede repq's one-line refusal
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head == b"PK" or head[:1] == b"\x80":  # a torch zip or a pickle stream that the safe loader refused
            raise RepqError(f"refusing to load {path}: it holds objects other than tensors, whose loading could "
                            "run code") from None
        raise RepqError(f"{path} is not a readable checkpoint (not a torch file); is it complete?") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise RepqError(f"{path} is not a readable checkpoint ({type(exc).__name__}); is the file complete?") from None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw checkpoint dictionary, safely unpickled; one-line errors for missing or foreign files."""
    payload = safe_torch_load(path, "train one with `repq train` or check the path")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RepqError(f"{path} is not a repq checkpoint; convert a foreign state dict with repq's loaders first")
    if payload.get("version", 0) > VERSION:
        raise RepqError(f"{path} was written by a newer repq (format {payload['version']}); upgrade repq")
    return payload


def _load_state(model: nn.Module, state: dict[str, Any], where: str, expected: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise RepqError(f"checkpoint {where} does not fit {expected}: parameter names or shapes differ") from None


def _build(payload: dict[str, Any], path: str) -> nn.Module:
    """The model the checkpoint's config describes (quantized structure included); one-line errors for configs
    that cannot be built (hand-edited, corrupt)."""
    config = payload.get("model")
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise RepqError(f"{path} has no valid model config (the 'model' entry); the file is damaged")
    config = dict(config)
    try:
        model = create_model(config.pop("name"), **config)
        if payload.get("quant"):
            from repq.ptq import restore_quantized
            model = restore_quantized(model, payload["quant"])
    except RepqError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here comes from the file's config
        raise RepqError(f"{path}: its model config or quantization metadata cannot be used ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); the file is damaged or edited") from None
    return model


def _check_values(payload: dict[str, Any], path: str) -> None:
    """Refuse NaN / Inf in the weights and in the quantization scales before anything runs on them."""
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RepqError(f"{path} has no state dict of tensors; the file is damaged")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RepqError(f"{path} has NaN/Inf values in '{name}'; the checkpoint is corrupt")
    quant = payload.get("quant") or {}
    for name, spec in {**(quant.get("layers") or {}), **(quant.get("pools") or {})}.items():
        scale = spec.get("input_scale") if isinstance(spec, dict) else None
        if scale is not None and not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
            raise RepqError(f"{path} has an invalid input scale ({scale}) for '{name}'; the checkpoint is corrupt")


def _add_zero_points(state: dict[str, torch.Tensor]) -> None:
    """Activation quantizers saved before affine grids existed (scale, qmin, qmax; no zero_point) had zero point
    0: give them that buffer, so older quantized checkpoints keep loading."""
    for key in [k for k in state if k.endswith(".qmin")]:
        prefix = key[:-len("qmin")]
        if prefix + "scale" in state and prefix + "qmax" in state and prefix + "zero_point" not in state:
            state[prefix + "zero_point"] = torch.zeros((), dtype=state[prefix + "scale"].dtype)


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes (train-time, fused or quantized) in eval mode. The config is first
    built on the meta device (no memory) and compared with the state dict, so a config that claims a huge model
    is refused before anything is allocated."""
    payload = read_checkpoint(path)
    _check_values(payload, str(path))
    _add_zero_points(payload["state_dict"])
    with torch.device("meta"):
        skeleton = _build(payload, str(path))
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    held = {k: tuple(v.shape) for k, v in payload["state_dict"].items()}
    if expected != held:
        wrong = sorted(set(expected) ^ set(held)) or [k for k in expected if expected[k] != held[k]]
        raise RepqError(f"checkpoint {path} does not fit {_describe(payload['model'])}: parameter names or shapes "
                        f"differ (e.g. '{wrong[0]}'); the file is damaged or edited")
    model = _build(payload, str(path))
    _load_state(model, payload["state_dict"], str(path), _describe(payload["model"]))
    return model.eval(), payload


def load_into(model: nn.Module, path: str | os.PathLike, payload: dict[str, Any] | None = None) -> nn.Module:
    """Load a checkpoint's state into an existing model, refusing a different architecture or class count.
    `payload` is the checkpoint already read from `path` (so it is not read twice)."""
    payload = payload if payload is not None else read_checkpoint(path)
    mine = getattr(model, "repq_config", {})
    theirs = payload["model"]
    differ = {k for k in set(mine) | set(theirs) if k != "deploy" and mine.get(k) != theirs.get(k)}
    if differ or mine.get("deploy", False) != theirs.get("deploy", False):
        raise RepqError(f"checkpoint {path} holds {_describe(theirs)} but the model is {_describe(mine)}; "
                        "build the model the checkpoint was trained with")
    _load_state(model, payload["state_dict"], str(path), _describe(mine))
    return model

"""Import weights of the RepVGG checkpoints users already have (no network: the user passes the file).

Layouts: "original" (DingXiaoH/RepVGG and YOLOv6-style keys, which are repq's own, optionally under `module.`)
and "mmpretrain" (OpenMMLab: backbone.stem, backbone.stage_N.i.branch_3x3.conv/norm, branch_1x1, branch_norm,
head.fc, as mmpretrain's own RepVGG converter names them).
Files are read with torch.load(weights_only=True): loading never runs code from them. Checkpoints that pickle a
whole model object (YOLOv6 saves `{"model": model.half(), ...}`) are read with `read_pickled_modules`, an
unpickler that resolves every class to an inert stand-in, so nothing from the file is imported or called; only
the tensors of the modules' `_parameters` and `_buffers` are kept.
"""
from __future__ import annotations

import os
import pickle
import re
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from repq.checkpoint import safe_torch_load
from repq.errors import RepqError

_MMPRETRAIN_RULES = [
    (re.compile(r"^backbone\.stem\."), "stage0."),
    (re.compile(r"^backbone\.stage_(\d+)\."), r"stage\1."),
    (re.compile(r"\.branch_3x3\."), ".rbr_dense."),
    (re.compile(r"\.branch_1x1\."), ".rbr_1x1."),
    (re.compile(r"\.branch_norm\."), ".rbr_identity."),
    (re.compile(r"\.branch_reparam\."), ".rbr_reparam."),
    (re.compile(r"\.(rbr_dense|rbr_1x1)\.norm\."), r".\1.bn."),
    (re.compile(r"^head\.fc\."), "linear."),
]


# what a pickled nn.Module needs from torch to rebuild its tensors: nothing else from the file is resolved
_TORCH_REBUILDERS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                     ("torch._utils", "_rebuild_parameter_with_state"), ("collections", "OrderedDict"),
                     ("torch", "Size"), ("torch._tensor", "_rebuild_from_type_v2")}


class _Inert:
    """Stands in for any class or function named in the file: records its arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict):
            self.__dict__.update(state)


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _TORCH_REBUILDERS:
            return super().find_class(module, name)
        return type(name, (_Inert,), {"__module__": "repq.inert." + module})


# torch.load's wrapper subclasses `pickle_module.Unpickler`; storages it resolves itself
_INERT_PICKLE = SimpleNamespace(Unpickler=_InertUnpickler, load=pickle.load, __name__="repq_inert_pickle")


def _module_state(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict of an inert stand-in of an nn.Module: its `_parameters` and `_buffers`, recursively."""
    state: dict[str, torch.Tensor] = {}
    for kind in ("_parameters", "_buffers"):
        for name, value in (getattr(obj, "__dict__", {}).get(kind) or {}).items():
            if isinstance(value, torch.Tensor):
                state[prefix + name] = value.detach().float() if value.is_floating_point() else value
    for name, child in (getattr(obj, "__dict__", {}).get("_modules") or {}).items():
        if child is not None:
            state.update(_module_state(child, f"{prefix}{name}."))
    return state


def read_pickled_modules(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict (float32) of the model object pickled in a training checkpoint (YOLOv6: `ckpt["ema"]` if
    present, else `ckpt["model"]`), without importing or running anything named in the file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_INERT_PICKLE)
    except Exception as exc:  # noqa: BLE001 - any failure of this reader is "not a file we can read"
        raise RepqError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from None
    candidates = [payload.get(k) for k in ("ema", "model")] if isinstance(payload, dict) else [payload]
    for obj in candidates:
        state = _module_state(obj) if isinstance(obj, _Inert) else {}
        if state:
            return state
    raise RepqError(f"{path} holds no model object or state dict of tensors")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a foreign checkpoint (a bare state dict, or under state_dict / model; a
    pickled model object, as YOLOv6 saves it, is read by `read_pickled_modules`)."""
    try:
        payload = safe_torch_load(path, "pass the checkpoint file you downloaded")
    except RepqError as err:
        if "could run code" not in str(err):
            raise
        return read_pickled_modules(path)
    for key in ("state_dict", "model", "net"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
            break
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise RepqError(f"{path} holds no state dict of tensors")
    return payload


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith(("backbone.stage_", "backbone.stem.")) for k in state):
        return "mmpretrain"
    if any(".rbr_dense." in k or ".rbr_reparam." in k for k in state):
        return "original"
    raise RepqError("unknown checkpoint layout: expected RepVGG keys (rbr_dense / rbr_reparam) or mmpretrain "
                    "keys (backbone.stage_N.*.branch_3x3)")


def to_repq_keys(state: dict[str, torch.Tensor], layout: str = "auto") -> dict[str, torch.Tensor]:
    """Rename the keys of a foreign RepVGG state dict to repq's RepVGG."""
    layout = detect_layout(state) if layout == "auto" else layout
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if layout == "mmpretrain":
            if not (key.startswith("backbone.") or key.startswith("head.")):
                continue
            for pattern, repl in _MMPRETRAIN_RULES:
                key = pattern.sub(repl, key)
        elif layout != "original":
            raise RepqError(f"unknown layout '{layout}'; use auto, original or mmpretrain")
        out[key] = value
    return out


def load_foreign_weights(model: nn.Module, path: str | os.PathLike, layout: str = "auto") -> nn.Module:
    """Load a foreign RepVGG checkpoint into a repq RepVGG (train-time or deploy form); one-line error on
    mismatch naming what differs."""
    state = to_repq_keys(read_state_dict(path), layout)
    mine = model.state_dict()
    missing = [k for k in mine if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in mine]
    wrong = [k for k in state if k in mine and state[k].shape != mine[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(wrong)} with other shapes (e.g. {wrong[0]})" if wrong else ""]
        config = getattr(model, "repq_config", {})
        raise RepqError(f"{path} does not fit {config.get('name', 'the model')} "
                        f"(num_classes={config.get('num_classes')}, deploy={config.get('deploy', False)}): "
                        + ", ".join(p for p in parts if p) + "; check --model, --num-classes and --deploy")
    model.load_state_dict(state, strict=False)
    return model

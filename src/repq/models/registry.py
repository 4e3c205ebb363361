"""A registry of model factories (as in timm): `create_model(name, **kwargs)` is the only way models are built,
and the model remembers its name and arguments so a checkpoint can rebuild it."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

from torch import nn

from repq.errors import RepqError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; `deploy=True` builds the fused (plain-conv) form directly."""
    if name not in _REGISTRY:
        raise RepqError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}")
    factory = _REGISTRY[name]
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise RepqError(f"model '{name}' does not take {', '.join(unknown)}; it takes {', '.join(params)}")
    model = factory(**kwargs)
    # Plain values only (a checkpoint stores this and is loaded without running code): config objects become dicts.
    model.repq_config = {"name": name, **{k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                                          for k, v in kwargs.items()}}
    return model

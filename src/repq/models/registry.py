"""A registry of model factories (as in timm): `create_model(name, **kwargs)` is the only way models are built,
and the model remembers its name and arguments so a checkpoint can rebuild it."""
from __future__ import annotations

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
    model = _REGISTRY[name](**kwargs)
    model.repq_config = {"name": name, **kwargs}
    return model

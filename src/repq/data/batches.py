"""Turn whatever a user passes as data (DataLoader, dataset, iterable of batches, tensor) into batches."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from repq.errors import RepqError

Batch = tuple[Tensor, Tensor | None]


def _as_batch(item: Any) -> Batch:
    if isinstance(item, Tensor):
        return item, None
    if isinstance(item, dict) and "image" in item:
        return item["image"], item.get("label")
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        labels = item[1] if len(item) > 1 and isinstance(item[1], Tensor) else None
        return item[0], labels
    raise RepqError(f"cannot read a batch from {type(item).__name__}; pass image tensors or (images, labels) pairs")


def iter_batches(data: Any, batch_size: int = 256) -> Iterator[Batch]:
    """Yield (images, labels-or-None) batches; a tensor or (images, labels) pair is cut into `batch_size` chunks."""
    if isinstance(data, Tensor):
        data = (data,)
    if isinstance(data, (tuple, list)) and 1 <= len(data) <= 2 and all(isinstance(t, Tensor) for t in data) \
            and data[0].dim() == 4:
        images, labels = data[0], (data[1] if len(data) == 2 else None)
        if labels is None or (labels.dim() == 1 and len(labels) == len(images)):
            for start in range(0, len(images), batch_size):
                end = start + batch_size
                yield images[start:end], None if labels is None else labels[start:end]
            return
    if hasattr(data, "batches"):
        yield from data.batches(batch_size)
        return
    if not isinstance(data, Iterable):
        raise RepqError(f"cannot iterate over {type(data).__name__}; pass a DataLoader, a tensor or a list of batches")
    for item in data:
        images, labels = _as_batch(item)
        if images.dim() == 3:
            images = images.unsqueeze(0)
            labels = labels.reshape(1) if labels is not None else None
        yield images, labels


def take_images(data: Any, num_samples: int, seed: int = 0) -> Tensor:
    """At most `num_samples` images from `data`: a seeded random subset of a tensor, else the first ones."""
    if isinstance(data, Tensor) and data.dim() == 4 and len(data) > num_samples:
        gen = torch.Generator().manual_seed(seed)
        return data[torch.randperm(len(data), generator=gen)[:num_samples]]
    if hasattr(data, "calibration_images"):
        return data.calibration_images(num_samples, seed)
    taken, count = [], 0
    for images, _ in iter_batches(data, batch_size=num_samples):
        taken.append(images[: num_samples - count])
        count += len(taken[-1])
        if count >= num_samples:
            break
    if not taken:
        raise RepqError("the calibration data is empty; pass at least one image")
    return torch.cat(taken).float()

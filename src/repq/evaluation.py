"""Top-1 / top-5 accuracy of any model (train-time, fused or quantized) on labelled data."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from repq.data.batches import iter_batches
from repq.errors import RepqError


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, batch_size: int = 256, progress: bool = False) -> dict[str, float]:
    """{"top1": %, "top5": %, "n": images}; `data` yields (images, labels) (a DataLoader, a dataset, a pair)."""
    was_training = model.training
    model.eval()
    first = next(model.parameters(), None)  # converted models (e.g. torch FX int8) may have no parameters
    device = first.device if first is not None else torch.device("cpu")
    correct1 = correct5 = total = 0
    batches = iter_batches(data, batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="eval", leave=False, unit="batch", disable=None)
    try:
        for images, labels in batches:
            if labels is None:
                raise RepqError("evaluation data has no labels; pass (images, labels) batches")
            logits = model(images.to(device).float())
            if logits.shape[-1] <= int(labels.max()):
                raise RepqError(f"labels go up to {int(labels.max())} but the model has {logits.shape[-1]} classes; "
                                "use a checkpoint trained on this data")
            top = logits.topk(min(5, logits.shape[-1]), dim=1).indices.cpu()
            hits = top == labels.reshape(-1, 1)
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            total += len(labels)
    finally:
        model.train(was_training)
    if total == 0:
        raise RepqError("evaluation data is empty")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "n": total}

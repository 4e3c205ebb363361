"""Top-1 / top-5 accuracy of any model (train-time, fused, quantized, or a callable such as an ONNX Runtime
session wrapper) on labelled data, with the model's own throughput."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from repq.data.batches import iter_batches
from repq.errors import RepqError


@torch.no_grad()
def evaluate(model: nn.Module | Callable[[Tensor], Tensor], data: Any, batch_size: int = 256,
             progress: bool = False) -> dict[str, float]:
    """{"top1": %, "top5": %, "n": images, "seconds": wall time, "model_seconds": time in the forward passes,
    "images_per_s": n / model_seconds}; `data` yields (images, labels) (a DataLoader, a dataset, a pair). On a
    DetectionDataset it returns the detector's COCO {"map", "map50", ...} (repq.detect.evaluate_detection)."""
    if getattr(data, "task", None) == "detect":   # a DetectionDataset: COCO mAP instead of top-k
        from repq.detect.training import evaluate_detection
        return evaluate_detection(model, data, min(batch_size, 32), progress)
    is_module = isinstance(model, nn.Module)
    was_training = model.training if is_module else False
    first = next(model.parameters(), None) if is_module else None  # converted models may have no parameters
    device = first.device if first is not None else torch.device("cpu")
    if is_module:
        model.eval()
    correct1 = correct5 = total = 0
    model_seconds = 0.0
    began = time.perf_counter()
    batches = iter_batches(data, batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="eval", leave=False, unit="batch", disable=None)
    try:
        for images, labels in batches:
            if labels is None:
                raise RepqError("evaluation data has no labels; pass (images, labels) batches")
            start = time.perf_counter()
            logits = model(images.to(device).float())
            top = logits.topk(min(5, logits.shape[-1]), dim=1).indices.cpu()   # .cpu() waits for the GPU
            model_seconds += time.perf_counter() - start
            if logits.shape[-1] <= int(labels.max()):
                raise RepqError(f"labels go up to {int(labels.max())} but the model has {logits.shape[-1]} classes; "
                                "use a checkpoint trained on this data")
            hits = top == labels.reshape(-1, 1)
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            total += len(labels)
    finally:
        if is_module:
            model.train(was_training)
    if total == 0:
        raise RepqError("evaluation data is empty")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "n": total,
            "seconds": time.perf_counter() - began, "model_seconds": model_seconds,
            "images_per_s": total / max(model_seconds, 1e-9)}

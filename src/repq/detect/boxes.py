"""Box geometry for the anchor-free detector: anchor points, ltrb decoding, IoU / GIoU, NMS, post-processing.

Boxes are (x1, y1, x2, y2) in input pixels. A level map of stride s has one anchor point per cell, at the cell
center ((i + 0.5) s, (j + 0.5) s); the head predicts distances (l, t, r, b) to the box sides in units of s.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def anchor_points(shapes: Sequence[tuple[int, int]], strides: Sequence[int], device=None,
                  dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """(A, 2) cell centers in pixels and (A, 1) their strides, level after level, row-major within a level."""
    points, stride_column = [], []
    for (h, w), s in zip(shapes, strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
        stride_column.append(torch.full((h * w, 1), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(stride_column)


def dist2bbox(distances: Tensor, points: Tensor) -> Tensor:
    """(..., 4) ltrb distances from (..., 2) points -> (..., 4) x1y1x2y2."""
    lt, rb = distances[..., :2], distances[..., 2:]
    return torch.cat([points - lt, points + rb], -1)


def bbox2dist(points: Tensor, boxes: Tensor) -> Tensor:
    """Inverse of dist2bbox."""
    return torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], -1)


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) IoU of every box of `a` (N, 4) with every box of `b` (M, 4)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter).clamp(min=1e-9)


def paired_iou(a: Tensor, b: Tensor, giou: bool = False, eps: float = 1e-7) -> Tensor:
    """IoU (or GIoU) of matching rows of `a` and `b` (..., 4); degenerate predicted boxes count as empty."""
    inter = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    union = box_area(a) + box_area(b) - inter + eps
    iou = inter / union
    if not giou:
        return iou
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1) + eps
    return iou - (hull - union) / hull


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first. A box is dropped when its
    IoU with a kept, higher-scoring box exceeds `iou_threshold`. Computed as the fixed point of "keep j unless a
    kept higher-scoring box suppresses it", which is greedy NMS's result, with whole-matrix steps instead of a
    Python loop over the boxes (the number of steps is the longest chain of suppressions, usually a few)."""
    order = scores.argsort(descending=True, stable=True)
    boxes = boxes[order]
    suppresses = (box_iou(boxes, boxes) > iou_threshold).triu_(1)    # [i, j]: i ranks above j and overlaps it
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    while True:
        new = ~(suppresses & keep[:, None]).any(0)
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> Tensor:
    """Per-class NMS in one pass: boxes of different classes are moved apart so they never overlap."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offset = classes.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset, scores, iou_threshold)


def flatten_levels(outputs: Sequence[Tensor], num_classes: int) -> tuple[Tensor, Tensor, list[tuple[int, int]]]:
    """Head maps (B, 4 + C, H, W) per level -> (B, A, 4) distances, (B, A, C) logits, and the level shapes."""
    shapes = [tuple(o.shape[-2:]) for o in outputs]
    flat = torch.cat([o.flatten(2) for o in outputs], 2).transpose(1, 2)
    if flat.shape[-1] != 4 + num_classes:
        raise ValueError(f"head outputs have {flat.shape[-1]} channels, expected 4 + {num_classes}")
    return flat[..., :4], flat[..., 4:], shapes


def decode(outputs: Sequence[Tensor], num_classes: int, strides: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(B, A, 4) boxes in pixels and (B, A, C) class probabilities from the raw level maps."""
    distances, logits, shapes = flatten_levels(outputs, num_classes)
    points, stride_column = anchor_points(shapes, strides, distances.device, distances.dtype)
    return dist2bbox(distances * stride_column, points), logits.sigmoid()


@torch.no_grad()
def postprocess(outputs: Sequence[Tensor], num_classes: int, strides: Sequence[int], conf_threshold: float = 0.001,
                iou_threshold: float = 0.65, max_det: int = 100, max_candidates: int = 1000) -> list[Tensor]:
    """Per image, (K, 6) detections x1, y1, x2, y2, score, class after per-class NMS. Every (anchor, class) pair
    above `conf_threshold` is a candidate (multi-label, as YOLOv6's evaluation), the best `max_candidates` go to
    NMS."""
    boxes, probs = decode([o.float() for o in outputs], num_classes, strides)
    results = []
    for b, p in zip(boxes, probs):
        anchor, cls = (p > conf_threshold).nonzero(as_tuple=True)
        scores = p[anchor, cls]
        if len(scores) > max_candidates:
            top = scores.topk(max_candidates).indices
            anchor, cls, scores = anchor[top], cls[top], scores[top]
        kept = batched_nms(b[anchor], scores, cls, iou_threshold)[:max_det]
        results.append(torch.cat([b[anchor[kept]], scores[kept, None], cls[kept, None].to(b.dtype)], 1))
    return results

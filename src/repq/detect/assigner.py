"""Task-aligned assignment (TOOD, Feng et al. 2021), as YOLOv6 uses it (topk 13, alpha 1, beta 6).

For each ground-truth box, the anchor points whose centers lie inside it are ranked by the alignment metric
t = s^alpha * u^beta (s: the predicted probability of the box's class, u: the IoU of the predicted box with it); the
top k become positives. An anchor claimed by several boxes goes to the one it overlaps most. The class target of a
positive is its normalized alignment t / max(t) * max(u) (per box), so the classifier learns to score localization
quality.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from repq.detect.boxes import paired_iou


@dataclass
class Assignment:
    labels: Tensor      # (B, A) class index of the assigned box (0 for background anchors)
    boxes: Tensor       # (B, A, 4) the assigned box, x1y1x2y2 pixels
    scores: Tensor      # (B, A, C) soft class targets (zero rows for background)
    foreground: Tensor  # (B, A) bool


@torch.no_grad()
def task_aligned_assign(pred_scores: Tensor, pred_boxes: Tensor, points: Tensor, gt_labels: Tensor,
                        gt_boxes: Tensor, gt_mask: Tensor, topk: int = 13, alpha: float = 1.0, beta: float = 6.0,
                        eps: float = 1e-9) -> Assignment:
    """pred_scores (B, A, C) probabilities, pred_boxes (B, A, 4) pixels, points (A, 2); gt_labels (B, M) long,
    gt_boxes (B, M, 4), gt_mask (B, M) bool (padding rows False)."""
    batch, anchors, classes = pred_scores.shape
    if gt_boxes.shape[1] == 0:
        return Assignment(torch.zeros(batch, anchors, dtype=torch.long, device=pred_scores.device),
                          torch.zeros(batch, anchors, 4, device=pred_scores.device), torch.zeros_like(pred_scores),
                          torch.zeros(batch, anchors, dtype=torch.bool, device=pred_scores.device))
    # (B, M, A): anchor centre strictly inside the box
    lt = points[None, None] - gt_boxes[:, :, None, :2]
    rb = gt_boxes[:, :, None, 2:] - points[None, None]
    inside = torch.cat([lt, rb], -1).amin(-1) > eps
    candidate = inside & gt_mask[:, :, None]
    overlaps = paired_iou(gt_boxes[:, :, None, :], pred_boxes[:, None, :, :]).clamp(min=0) * candidate
    class_scores = pred_scores.gather(2, gt_labels.clamp(min=0)[:, None, :].expand(batch, anchors, -1))
    class_scores = class_scores.transpose(1, 2) * candidate                        # (B, M, A)
    metric = class_scores.pow(alpha) * overlaps.pow(beta)
    k = min(topk, anchors)
    top = metric.topk(k, dim=-1).indices
    in_topk = torch.zeros_like(candidate).scatter_(-1, top, True)
    positive = in_topk & candidate                                                # (B, M, A)
    # an anchor claimed by several boxes keeps the one it overlaps most
    multiple = positive.sum(1, keepdim=True) > 1
    best = torch.zeros_like(positive).scatter_(1, overlaps.argmax(1, keepdim=True), True)
    positive = torch.where(multiple, best & candidate, positive)
    foreground = positive.any(1)                                                  # (B, A)
    index = positive.to(torch.uint8).argmax(1)                                    # (B, A) box index
    labels = gt_labels.gather(1, index).clamp(min=0)
    boxes = gt_boxes.gather(1, index[..., None].expand(-1, -1, 4))
    metric = metric * positive
    best_metric = metric.amax(-1, keepdim=True)
    best_overlap = (overlaps * positive).amax(-1, keepdim=True)
    normalized = (metric * best_overlap / (best_metric + eps)).amax(1)            # (B, A)
    scores = torch.nn.functional.one_hot(labels, classes).to(pred_scores.dtype)
    scores = scores * (foreground.to(scores.dtype) * normalized)[..., None]
    return Assignment(labels, boxes, scores, foreground)

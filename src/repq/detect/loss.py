"""YOLOv6's detection loss: varifocal classification loss (VFL) on task-aligned soft targets plus a GIoU box loss
on the positive anchors, both normalized by the sum of the soft targets; weights 1 (class) and 2.5 (box)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from repq.detect.assigner import task_aligned_assign
from repq.detect.boxes import anchor_points, dist2bbox, flatten_levels, paired_iou


def pad_targets(targets: Sequence[tuple[Tensor, Tensor]], device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (boxes (n, 4), labels (n,)) -> padded (B, M, 4) boxes, (B, M) labels, (B, M) mask."""
    most = max((len(labels) for _, labels in targets), default=0)
    boxes = torch.zeros(len(targets), most, 4, device=device)
    labels = torch.zeros(len(targets), most, dtype=torch.long, device=device)
    mask = torch.zeros(len(targets), most, dtype=torch.bool, device=device)
    for i, (b, l) in enumerate(targets):
        boxes[i, :len(l)] = b.to(device, torch.float32)
        labels[i, :len(l)] = l.to(device)
        mask[i, :len(l)] = True
    return boxes, labels, mask


def varifocal_loss(logits: Tensor, targets: Tensor, positive: Tensor, alpha: float = 0.75,
                   gamma: float = 2.0) -> Tensor:
    """VFL (Zhang et al. 2021): negatives weighted by alpha p^gamma, positives by their target score q."""
    p = logits.sigmoid()
    weight = alpha * p.detach().pow(gamma) * (~positive) + targets * positive
    return (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight).sum()


@dataclass
class DetectionLoss:
    num_classes: int
    strides: Sequence[int] = (8, 16, 32)
    class_weight: float = 1.0
    box_weight: float = 2.5
    topk: int = 13

    def __call__(self, outputs: Sequence[Tensor], targets: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, dict]:
        distances, logits, shapes = flatten_levels(outputs, self.num_classes)
        distances, logits = distances.float(), logits.float()
        points, stride_column = anchor_points(shapes, self.strides, distances.device)
        pred_boxes = dist2bbox(distances * stride_column, points)
        gt_boxes, gt_labels, gt_mask = pad_targets(targets, distances.device)
        assigned = task_aligned_assign(logits.detach().sigmoid(), pred_boxes.detach(), points, gt_labels, gt_boxes,
                                       gt_mask, topk=self.topk)
        normalizer = assigned.scores.sum().clamp(min=1.0)
        positive = F.one_hot(assigned.labels, self.num_classes).bool() & assigned.foreground[..., None]
        class_loss = varifocal_loss(logits, assigned.scores, positive) / normalizer
        fg = assigned.foreground
        if fg.any():
            weight = assigned.scores.sum(-1)[fg]
            giou = paired_iou(pred_boxes[fg], assigned.boxes[fg], giou=True)
            box_loss = ((1.0 - giou) * weight).sum() / normalizer
        else:
            box_loss = distances.sum() * 0.0
        total = self.class_weight * class_loss + self.box_weight * box_loss
        return total, {"cls": float(class_loss.detach()), "box": float(box_loss.detach()),
                       "positives": int(fg.sum())}


def prediction_distillation(student: Sequence[Tensor], teacher: Sequence[Tensor], num_classes: int) -> Tensor:
    """Distillation of a detector's dense predictions from a teacher's (the float model during QAT): binary cross
    entropy of the student's class logits against the teacher's class probabilities, plus the L1 distance between
    their box distances (in strides), weighted per anchor by the teacher's highest class probability so that the
    background does not drown the objects; both averaged over that weight. Why: the quantized student starts from
    the teacher's weights, and the teacher's soft outputs carry more per image than the assigned hard targets
    (its scores on every anchor, its boxes where it sees objects)."""
    s_dist, s_logits, _ = flatten_levels(student, num_classes)
    t_dist, t_logits, _ = flatten_levels([t.detach() for t in teacher], num_classes)
    t_prob = t_logits.float().sigmoid()
    weight = t_prob.max(dim=-1).values
    normalizer = weight.sum().clamp(min=1.0)
    class_term = (F.binary_cross_entropy_with_logits(s_logits.float(), t_prob, reduction="none").sum(-1)
                  * weight).sum() / normalizer
    box_term = ((s_dist.float() - t_dist.float()).abs().sum(-1) * weight).sum() / normalizer
    return class_term + box_term

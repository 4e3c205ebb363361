"""COCO mAP with pycocotools' own evaluator (the reference implementation): mAP@0.5:0.95 and mAP@0.5, on boxes in
the dataset's frame. Ground truth and detections are handed to it in memory."""
from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np
from torch import Tensor

from repq.errors import RepqError


def coco_map(ground_truth: Sequence[tuple[Tensor, Tensor]], detections: Sequence[Tensor],
             num_classes: int) -> dict[str, float]:
    """`ground_truth`: per image (boxes (n, 4) x1y1x2y2, labels (n,)); `detections`: per image (k, 6) x1, y1, x2,
    y2, score, class. Returns {"map": mAP@0.5:0.95, "map50": mAP@0.5} in percent (COCO's 101-point interpolation,
    areas from the boxes, at most 100 detections per image)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise RepqError("mAP needs pycocotools: pip install pycocotools (or pip install 'repq[detect]')") from None
    if len(ground_truth) != len(detections):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(detections)} detection lists")
    images, annotations = [], []
    for image_id, (boxes, labels) in enumerate(ground_truth, start=1):
        images.append({"id": image_id})
        for box, label in zip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels).reshape(-1)):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                                "bbox": [float(box[0]), float(box[1]), float(w), float(h)], "area": float(w * h),
                                "iscrowd": 0})
    if not annotations:
        raise RepqError("the evaluation images have no boxes; mAP is undefined")
    results = []
    for image_id, det in enumerate(detections, start=1):
        for x1, y1, x2, y2, score, cls in np.asarray(det, dtype=np.float64).reshape(-1, 6):
            results.append({"image_id": image_id, "category_id": int(cls) + 1, "score": float(score),
                            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})
    if not results:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints its progress and summary
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c + 1} for c in range(num_classes)]}
        gt.createIndex()
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    return {"map": max(0.0, float(stats[0])) * 100.0, "map50": max(0.0, float(stats[1])) * 100.0}

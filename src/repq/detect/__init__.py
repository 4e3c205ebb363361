"""Detection: box geometry, task-aligned assignment, the YOLOv6 loss, training, COCO mAP evaluation."""

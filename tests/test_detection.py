"""Detection: box geometry, NMS, the assigner and COCO mAP against independent computations on hand-made cases; the
composed data and the COCO / YOLO readers; a tiny detector that learns, quantizes and runs in ONNX Runtime."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import repq
from repq.data.detection import (DetectionDataset, compose_scenes, load_coco, load_yolo, write_coco, write_yolo)
from repq.detect.assigner import task_aligned_assign
from repq.detect.boxes import (anchor_points, batched_nms, bbox2dist, box_iou, decode, dist2bbox, nms, paired_iou,
                               postprocess)
from repq.detect.metrics import coco_map
from repq.errors import RepqError
from tests.conftest import randomize_bn


# ---------------------------------------------------------------- independent references (plain Python)
def py_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def py_greedy_nms(boxes, scores, threshold) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        if all(py_iou(boxes[i], boxes[k]) <= threshold for k in keep):
            keep.append(i)
    return keep


# ---------------------------------------------------------------- geometry
def test_iou_and_giou_match_hand_values():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    assert box_iou(a, b)[0].tolist() == pytest.approx([25 / 175, 0.0, 1.0])
    # GIoU of the disjoint pair: 0 - (hull 900 - union 200) / 900
    giou = paired_iou(a.expand(3, 4), b, giou=True)
    assert giou.tolist() == pytest.approx([25 / 175 - (225 - 175) / 225, -(900 - 200) / 900, 1.0], abs=1e-6)


def test_anchor_points_and_ltrb_round_trip():
    points, strides = anchor_points([(2, 3), (1, 1)], [8, 16])
    assert points.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12], [8, 8]]
    assert strides.flatten().tolist() == [8] * 6 + [16]
    boxes = torch.tensor([[1.0, 2.0, 9.0, 7.0]]).expand(7, 4)
    assert torch.allclose(dist2bbox(bbox2dist(points, boxes), points), boxes)


def test_decode_turns_stride_units_into_pixels():
    # one class, one 1x1 level of stride 32: distances (1, 0.5, 2, 1) x 32 around the point (16, 16)
    out = torch.zeros(1, 5, 1, 1)
    out[0, :4, 0, 0] = torch.tensor([1.0, 0.5, 2.0, 1.0])
    out[0, 4] = math.log(0.8 / 0.2)
    boxes, probs = decode([out], 1, [32])
    assert boxes[0, 0].tolist() == pytest.approx([16 - 32, 16 - 16, 16 + 64, 16 + 32])
    assert float(probs[0, 0, 0]) == pytest.approx(0.8)


def test_nms_matches_plain_greedy_nms():
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        xy = torch.rand(60, 2, generator=gen) * 40
        boxes = torch.cat([xy, xy + torch.rand(60, 2, generator=gen) * 25 + 1], 1)
        scores = torch.rand(60, generator=gen)
        expected = py_greedy_nms(boxes.tolist(), scores.tolist(), 0.5)
        assert nms(boxes, scores, 0.5).tolist() == expected, trial


def test_batched_nms_never_suppresses_across_classes():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    kept = batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5)
    assert sorted(kept.tolist()) == [0, 1]


def test_postprocess_keeps_multi_label_candidates_above_the_threshold():
    out = torch.full((1, 6, 1, 2), -10.0)            # two classes, two anchors at x = 16 and 48
    out[0, :4] = 0.25
    out[0, 4, 0, 0] = 3.0                            # anchor 0: class 0 (p 0.95)
    out[0, 5, 0, 1] = 0.0                            # anchor 1: class 1 (p 0.5)
    dets = postprocess([out], 2, [32], conf_threshold=0.01)[0]
    assert dets[:, 5].tolist() == [0, 1]
    assert dets[0, :4].tolist() == pytest.approx([8, 8, 24, 24])
    assert dets[:, 4].tolist() == pytest.approx([1 / (1 + math.exp(-3)), 0.5], abs=1e-6)


# ---------------------------------------------------------------- assigner
def reference_assign(scores, pred_boxes, points, gt_boxes, gt_labels, topk, alpha=1.0, beta=6.0):
    """Task-aligned assignment written out loop by loop (numpy), for one image."""
    num_anchors = len(points)
    metric = np.zeros((len(gt_boxes), num_anchors))
    overlap = np.zeros_like(metric)
    inside = np.zeros_like(metric, dtype=bool)
    for g, (box, label) in enumerate(zip(gt_boxes, gt_labels)):
        for a, (x, y) in enumerate(points):
            if min(x - box[0], y - box[1], box[2] - x, box[3] - y) > 1e-9:
                inside[g, a] = True
                overlap[g, a] = py_iou(box, pred_boxes[a])
                metric[g, a] = scores[a, label] ** alpha * overlap[g, a] ** beta
    positive = np.zeros_like(inside)
    for g in range(len(gt_boxes)):
        for a in np.argsort(-metric[g], kind="stable")[:topk]:
            positive[g, a] = inside[g, a]
    for a in range(num_anchors):
        if positive[:, a].sum() > 1:
            best = int(np.argmax(overlap[:, a]))
            positive[:, a] = False
            positive[best, a] = inside[best, a]
    targets = np.zeros_like(scores)
    for a in range(num_anchors):
        if positive[:, a].any():
            g = int(np.argmax(positive[:, a]))
            norm = metric[g, a] * (overlap[g] * positive[g]).max() / ((metric[g] * positive[g]).max() + 1e-9)
            targets[a, gt_labels[g]] = norm
    return positive.any(0), targets


def test_task_aligned_assignment_matches_a_loop_by_loop_computation():
    gen = torch.Generator().manual_seed(0)
    points, _ = anchor_points([(4, 4)], [8])
    scores = torch.rand(1, 16, 3, generator=gen)
    centers = points + torch.randn(16, 2, generator=gen)
    pred = torch.cat([centers - 6 - torch.rand(16, 2, generator=gen) * 4,
                      centers + 6 + torch.rand(16, 2, generator=gen) * 4], 1)[None]
    gt_boxes = torch.tensor([[[1.0, 1.0, 20.0, 18.0], [10.0, 6.0, 31.0, 30.0], [0.0, 0.0, 0.0, 0.0]]])
    gt_labels = torch.tensor([[2, 0, 0]])
    mask = torch.tensor([[True, True, False]])
    result = task_aligned_assign(scores, pred, points, gt_labels, gt_boxes, mask, topk=3)
    fg, targets = reference_assign(scores[0].numpy(), pred[0].tolist(), points.tolist(), gt_boxes[0, :2].tolist(),
                                   [2, 0], topk=3)
    assert result.foreground[0].tolist() == fg.tolist()
    assert fg.sum() >= 4                                   # both boxes got positives
    np.testing.assert_allclose(result.scores[0].numpy(), targets, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- COCO mAP (pycocotools) on hand-computed cases
def _truth(*boxes_labels):
    return [(torch.tensor([b for b, _ in img], dtype=torch.float32).reshape(-1, 4),
             torch.tensor([c for _, c in img])) for img in boxes_labels]


def test_map_on_hand_computed_cases():
    gt = _truth([([0, 0, 10, 10], 0)])
    # IoU 0.77: a match at the thresholds 0.50 ... 0.75 (6 of 10), so AP@0.5:0.95 = 0.6, AP@0.5 = 1
    one = coco_map(gt, [torch.tensor([[0, 0, 10, 7.7, 0.9, 0]])], 1)
    assert one == pytest.approx({"map": 60.0, "map50": 100.0})
    # a higher-scoring false positive first: precision 1/2 at recall 1 for every threshold
    two = coco_map(gt, [torch.tensor([[50, 50, 60, 60, 0.9, 0], [0, 0, 10, 10, 0.8, 0]])], 1)
    assert two == pytest.approx({"map": 50.0, "map50": 50.0})
    # the right box with the wrong class scores nothing; two classes average (one perfect, one missed)
    assert coco_map(gt, [torch.tensor([[0, 0, 10, 10, 0.9, 1]])], 2)["map"] == 0.0
    gt2 = _truth([([0, 0, 10, 10], 0), ([20, 20, 40, 40], 1)])
    assert coco_map(gt2, [torch.tensor([[0, 0, 10, 10, 0.9, 0]])], 2) == pytest.approx({"map": 50.0, "map50": 50.0})


def test_map_refuses_images_without_boxes():
    with pytest.raises(RepqError, match="no boxes"):
        coco_map(_truth([]), [torch.zeros(0, 6)], 1)


# ---------------------------------------------------------------- data
def _glyphs(n=20, side=8, seed=0):
    rng = np.random.default_rng(seed)
    g = np.zeros((n, side, side), dtype=np.uint8)
    g[:, 1:-1, 2:-2] = rng.integers(120, 255, (n, side - 2, side - 4))
    return g, np.arange(n) % 3


def test_composed_scenes_are_seeded_with_tight_boxes_inside_the_image():
    objects, labels = _glyphs()
    a = compose_scenes(objects, labels, objects, 12, 48, seed=5)
    b = compose_scenes(objects, labels, objects, 12, 48, seed=5)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    for boxes, labs in zip(a[1], a[2]):
        assert 1 <= len(boxes) <= 6 and len(boxes) == len(labs)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 48).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert set(labs.tolist()) <= {0, 1, 2}
        iou = box_iou(boxes, boxes) - torch.eye(len(boxes))
        assert float(iou.max()) <= 0.35 + 1e-6


def _tiny_set(n=24, size=64, seed=0) -> DetectionDataset:
    objects, labels = _glyphs(seed=seed)
    images, boxes, labs = compose_scenes(objects, labels, objects, n, size, seed=seed)
    return DetectionDataset(images, boxes, labs, ["a", "b", "c"], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "tiny")


@pytest.mark.parametrize("fmt", ["coco", "yolo"])
def test_readers_give_back_what_the_writers_wrote(tmp_path, fmt):
    data = _tiny_set(6)
    (write_coco if fmt == "coco" else write_yolo)(data, tmp_path, "val")
    back = (load_coco if fmt == "coco" else load_yolo)(str(tmp_path), "test", 64)
    assert back.classes == data.classes and torch.equal(back.images, data.images)
    for b1, b2, l1, l2 in zip(back.boxes, data.boxes, back.labels, data.labels):
        assert torch.equal(l1, l2)
        assert torch.allclose(b1, b2, atol=1e-3)


def test_letterbox_moves_boxes_with_the_image(tmp_path):
    from PIL import Image
    (tmp_path / "images" / "train").mkdir(parents=True)
    Image.new("RGB", (200, 100), (10, 20, 30)).save(tmp_path / "images" / "train" / "a.png")
    doc = {"images": [{"id": 7, "file_name": "a.png"}], "categories": [{"id": 3, "name": "x"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [20, 10, 100, 50]}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(doc))
    data = load_coco(str(tmp_path), "train", 100)
    # scale 0.5, the 100 x 50 image centred vertically (pad 25): box (20, 10, 120, 60) -> (10, 30, 60, 55)
    assert data.boxes[0].tolist() == [[10.0, 30.0, 60.0, 55.0]]
    assert data.labels[0].tolist() == [0] and data.classes == ["x"]


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"images": [], "annotations": []}), "needs 'images', 'annotations' and 'categories'"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}],
                 "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}]}), "bbox"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1}],
                 "annotations": [{"image_id": 1, "category_id": 9, "bbox": [1, 2, 3, 4]}]}), "category_id 9"),
])
def test_coco_reader_refuses_a_malformed_file_in_one_line_naming_it(tmp_path, content, match):
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances_train.json"
    path.write_text(content)
    with pytest.raises(RepqError, match=match) as info:
        load_coco(str(tmp_path), "train", 64)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("line,match", [("0 0.5 0.5 0.2", "expected 'class cx cy w h'"),
                                        ("1 0.5 1.5 0.2 0.2", r"in \[0, 1\]"),
                                        ("x 0.5 0.5 0.2 0.2", "expected"),
                                        ("5 0.5 0.5 0.2 0.2", "classes.txt names 3")])
def test_yolo_reader_refuses_a_malformed_label_line(tmp_path, line, match):
    write_yolo(_tiny_set(2), tmp_path, "train")
    label = sorted((tmp_path / "labels" / "train").iterdir())[0]
    label.write_text(line + "\n")
    with pytest.raises(RepqError, match=match) as info:
        load_yolo(str(tmp_path), "train", 64)
    assert str(label) in str(info.value)


def test_flip_augmentation_moves_the_boxes():
    data = _tiny_set(8)
    flipped_any = False
    for (images, targets), (plain, plain_targets) in zip(data.batches(8, augment=True, seed=1), data.batches(8)):
        for img, tgt, ref, ref_tgt in zip(images, targets, plain, plain_targets):
            if torch.equal(img, ref):
                assert torch.equal(tgt[0], ref_tgt[0])
            else:
                flipped_any = True
                assert torch.equal(img, ref.flip(-1))
                expected = ref_tgt[0].clone()
                expected[:, [0, 2]] = 64 - ref_tgt[0][:, [2, 0]]
                assert torch.equal(tgt[0], expected)
    assert flipped_any


# ---------------------------------------------------------------- the detector
def test_detector_outputs_three_levels_and_fuses_exactly():
    model = randomize_bn(repq.create_model("yolov6_pico", num_classes=3))
    x = torch.randn(2, 3, 64, 64)
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(2, 7, 8, 8), (2, 7, 4, 4), (2, 7, 2, 2)]
    fused = repq.reparameterize(model, x)
    for a, b in zip(outs, fused(x)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    rebuilt = repq.create_model("yolov6_pico", num_classes=3, deploy=True)
    rebuilt.load_state_dict(fused.state_dict())            # the deploy form has the fused model's structure


def test_tiny_detector_loss_falls():
    from repq.detect.training import DetectTrainConfig, train_detector
    data = _tiny_set(32)
    model = repq.create_model("yolov6_pico", num_classes=3)
    history = train_detector(model, data, DetectTrainConfig(epochs=12, batch_size=8, lr=0.05, ema_decay=0.0,
                                                            warmup_epochs=0.5), progress=False)
    first, last = np.mean(history["loss"][:4]), np.mean(history["loss"][-4:])
    assert last < 0.8 * first


def test_prediction_distillation_matches_an_independent_computation():
    from repq.detect.loss import prediction_distillation
    gen = torch.Generator().manual_seed(4)
    student = [torch.randn(2, 4 + 3, h, h, generator=gen) for h in (4, 2)]
    teacher = [torch.randn(2, 4 + 3, h, h, generator=gen) for h in (4, 2)]
    got = float(prediction_distillation(student, teacher, 3))
    # numpy, anchor by anchor: BCE against the teacher's probabilities + L1 of the distances, weighted by the
    # teacher's highest class probability, averaged over that weight
    total_cls = total_box = total_w = 0.0
    for s_map, t_map in zip(student, teacher):
        s_np, t_np = s_map.double().numpy(), t_map.double().numpy()
        for b in range(2):
            for y in range(s_np.shape[2]):
                for x in range(s_np.shape[3]):
                    s_a, t_a = s_np[b, :, y, x], t_np[b, :, y, x]
                    p = 1 / (1 + np.exp(-t_a[4:]))
                    q = 1 / (1 + np.exp(-s_a[4:]))
                    w = p.max()
                    total_cls += w * -(p * np.log(q) + (1 - p) * np.log(1 - q)).sum()
                    total_box += w * np.abs(s_a[:4] - t_a[:4]).sum()
                    total_w += w
    assert got == pytest.approx((total_cls + total_box) / max(total_w, 1.0), rel=1e-5)


def test_qat_with_distillation_stays_closer_to_the_float_detector():
    """The same QAT run with and without distillation: with it, the quantized detector's predictions end nearer the
    float teacher's (the task loss alone pulls them elsewhere)."""
    import copy

    from repq.detect.loss import prediction_distillation
    from repq.detect.training import DetectTrainConfig, train_detector
    data = _tiny_set(16)
    teacher = repq.create_model("yolov6_pico", num_classes=3).eval()
    images = data.head(8)[0]
    start = repq.prepare_qat(teacher, repq.QATConfig(method="lsq", w_bits=4, a_bits=4, num_samples=8), images)
    start.num_classes, start.strides = teacher.num_classes, teacher.strides
    with torch.no_grad():
        floor = float(prediction_distillation(teacher(images), teacher(images), 3))   # the teacher's own entropy
    gaps = {}
    for weight in (0.0, 5.0):
        qat = copy.deepcopy(start)
        config = DetectTrainConfig(epochs=6, batch_size=8, lr=0.01, warmup_epochs=0.0, ema_decay=0.0,
                                   distill=weight, augment=False)
        history = train_detector(qat, data, config, progress=False, teacher=teacher)
        assert all(np.isfinite(history["loss"]))
        with torch.no_grad():
            gaps[weight] = float(prediction_distillation(qat.eval()(images), teacher(images), 3)) - floor
    assert gaps[5.0] < 0.5 * gaps[0.0], gaps
    with pytest.raises(repq.RepqError, match="needs a teacher"):
        train_detector(qat, data, config, progress=False)


def test_near_zero_filters_keep_their_bias_exactly_after_quantization():
    """A head whose filters never trained (zero weights, bias 1): its weight scale must be widened so the int32 bias
    codes keep the bias (before, they saturated in the simulation and wrapped to negative in the export)."""
    model = randomize_bn(repq.create_model("yolov6_pico", num_classes=3))
    images = torch.randn(8, 3, 64, 64)
    qmodel = repq.quantize(model, images, repq.PTQConfig(num_samples=8, weight="minmax", activation="minmax",
                                                         bias_correction=False))
    head = qmodel.detect[2].reg_pred
    assert float(head.weight.abs().max()) == 0.0
    codes, step = head.bias_codes()
    assert codes.abs().max() <= 2 ** 30
    assert torch.allclose(codes * step, torch.ones(4), rtol=1e-6)
    assert qmodel.repq_quant["bias_grid_widened"]["detect.2.reg_pred"] == 4


@pytest.mark.slow
def test_quantized_detector_runs_in_onnx_runtime_with_the_simulation_s_map(tmp_path):
    pytest.importorskip("onnxruntime")
    from repq.detect.training import DetectTrainConfig, evaluate_detection, train_detector
    from repq.export import OnnxRuntimeModel, export_onnx
    data = _tiny_set(48)
    model = repq.create_model("yolov6_pico", num_classes=3)
    train_detector(model, data, DetectTrainConfig(epochs=3, batch_size=16, ema_decay=0.0), progress=False)
    for config in (repq.PTQConfig(num_samples=16), repq.PTQConfig(num_samples=16, cfws_deploy="two_branch")):
        qmodel = repq.quantize(model, data.calibration_images(16), config)
        path = export_onnx(qmodel, tmp_path / "det.onnx", data.head(1)[0])
        session = OnnxRuntimeModel(path)
        images = data.head(8)[0]
        for a, b in zip(session(images), qmodel(images)):
            assert float((a - b).abs().max()) <= 1e-3 * max(1.0, float(b.abs().max())) + 0.05
        sim, ort = evaluate_detection(qmodel, data), evaluate_detection(session, data)
        assert abs(sim["map"] - ort["map"]) <= 0.1


# ---------------------------------------------------------------- command line
def _cli(capsys, *argv):
    from repq.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def detect_dataset(tmp_path_factory):
    """A small detection set on disk in the COCO layout (train and val)."""
    root = tmp_path_factory.mktemp("coco")
    write_coco(_tiny_set(40, seed=0), root, "train")
    write_coco(_tiny_set(12, seed=1), root, "val")
    return root


@pytest.mark.slow
def test_cli_detection_train_ptq_export_eval(tmp_path, capsys, detect_dataset):
    data = f"coco:{detect_dataset}"
    fp, q, onnx_path = tmp_path / "fp.pt", tmp_path / "q.pt", tmp_path / "q.onnx"
    code, out, err = _cli(capsys, "train", "--model", "yolov6_pico", "--data", data, "--image-size", 64,
                          "--epochs", 2, "--batch-size", 8, "--out", fp, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "detect" and len(result["epochs"]) == 2 and "map" in result["epochs"][0]
    code, out, err = _cli(capsys, "ptq", "--checkpoint", fp, "--data", data, "--calib", 8, "--sensitivity",
                          "--sensitivity-images", 6, "--keep-sensitive", 2, "--out", q, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["sensitivity"]["layers"]) > 20 and len(result["results"]) == 2
    assert len(result["results"][1]["float_layers"]) == 2 and result["results"][1]["partial"] == 2
    code, out, err = _cli(capsys, "export", "--checkpoint", q, "--onnx", onnx_path, "--data", data, "--verify",
                          "--json")
    assert code == 0, err
    verify = json.loads(out)["verify"]
    assert verify["passed"] and abs(verify["map_repq"] - verify["map_onnxruntime"]) <= 0.1
    code, out, err = _cli(capsys, "eval", "--checkpoint", q, "--data", data, "--runtime", "ort", "--json")
    assert code == 0, err
    rows = json.loads(out)["results"]
    assert set(rows) == {"quantized", "quantized in ONNX Runtime"}
    code, out, err = _cli(capsys, "eval", "--checkpoint", fp, "--data", data, "--min-map", 99)
    assert code == 1 and "--min-map" in err
    code, out, err = _cli(capsys, "qat", "--checkpoint", fp, "--data", data, "--method", "lsq", "--epochs", 1,
                          "--batch-size", 8, "--max-steps", 2, "--distill", 1.0, "--calib", 8,
                          "--affine-activations", "--out", tmp_path / "qat.pt", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert {"fp", "start", "qat"} <= set(result) and "map" in result["qat"]
    # The head's SiLU-fed convs got affine grids; their zero points survive the checkpoint.
    loaded, payload = repq.load_checkpoint(tmp_path / "qat.pt")
    spec = payload["quant"]["layers"]["detect.0.cls_conv.conv"]
    assert spec["input_zero_point"] > 0 and not spec["input_signed"]
    assert int(loaded.get_submodule("detect.0.cls_conv.conv").input_quantizer.zero_point) == spec["input_zero_point"]


def test_cli_detection_mistakes_are_one_line_errors(tmp_path, capsys, detect_dataset):
    cases = [
        (["train", "--model", "yolov6_pico", "--data", "digits", "--out", tmp_path / "a.pt"], "means detection"),
        (["train", "--model", "repvgg_a0", "--data", f"coco:{detect_dataset}", "--out", tmp_path / "a.pt"],
         "means classification"),
        (["train", "--model", "yolov6_pico", "--data", "digits-det", "--small-input", "--out", tmp_path / "a.pt"],
         "--small-input"),
        (["train", "--model", "yolov6_pico", "--data", f"coco:{tmp_path / 'nowhere'}", "--out", tmp_path / "a.pt"],
         "no such folder"),
        (["train", "--model", "yolov6_pico", "--data", "digits-det", "--crop-pct", "0.9", "--out", tmp_path / "a.pt"],
         "--crop-pct"),
    ]
    for argv, needle in cases:
        code, out, err = _cli(capsys, *argv)
        assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert not (tmp_path / "a.pt").exists()
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "annotations" / "instances_train.json").write_text("{oops")
    code, _, err = _cli(capsys, "train", "--model", "yolov6_pico", "--data", f"coco:{bad}", "--out", tmp_path / "a.pt")
    assert code == 2 and "instances_train.json" in err and err.count("\n") == 1


@pytest.mark.slow
def test_torchrun_two_processes_train_a_detector(tmp_path, detect_dataset):
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537", "-m",
           "repq.cli", "train", "--model", "yolov6_pico", "--data", f"coco:{detect_dataset}", "--image-size", "64",
           "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--out", str(out), "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.exists() and len(list(tmp_path.glob("*.pt"))) == 1
    assert len(repq.checkpoint.read_checkpoint(out)["train_state"]["history"]["loss"]) == 2

"""The detectors of the detection benchmark: recipes, and their training (once, cached under runs/detect/).

    python benchmarks/detection_common.py                # trains the FP YOLOv6-N detector (about 45 min, 2 cores)
    python benchmarks/detection_common.py --quick        # a tiny detector on digits scenes (seconds)
"""
from __future__ import annotations

import argparse
import time

import torch

from common import CACHE, machine, repq
from repq.data.detection import load_detection
from repq.detect.training import DetectTrainConfig, evaluate_detection, train_detector

DETECTORS = {
    # the FP YOLOv6-N-like detector on composed Fashion-MNIST scenes (6000 train / 1000 val images, 128 px)
    "yolov6n_fmnist": {"model": "yolov6_n", "model_kwargs": {}, "data": "fashion-mnist-det",
                       "train": {"epochs": 20, "batch_size": 32, "lr": 0.02, "seed": 0}},
    # its OABN twin (identity-branch OABN, |t0| <= 1), same recipe and seed
    "yolov6n_fmnist_oabn": {"model": "yolov6_n", "model_kwargs": {"oabn": {"branches": "identity", "rule": "fixed",
                                                                          "tau": 1.0}},
                            "data": "fashion-mnist-det",
                            "train": {"epochs": 20, "batch_size": 32, "lr": 0.02, "seed": 0}},
}
QUICK = {"pico_digits": {"model": "yolov6_pico", "model_kwargs": {}, "data": "digits-det",
                         "train": {"epochs": 2, "batch_size": 32, "lr": 0.02, "seed": 0, "max_steps_per_epoch": 8,
                                   "ema_tau": 10.0}}}


def detector_checkpoint(name: str, quick: bool = False, progress: bool = True):
    """The trained detector `name` (training it the first time), cached with its recipe."""
    spec = (QUICK if quick else DETECTORS)[name]
    path = CACHE / "detect" / f"{name}.pt"
    if path.exists():
        payload = repq.checkpoint.read_checkpoint(path)
        if payload.get("detector_spec") == spec:
            return path
    train = load_detection(spec["data"], "train")
    val = load_detection(spec["data"], "test")
    torch.manual_seed(spec["train"]["seed"])
    model = repq.create_model(spec["model"], num_classes=train.num_classes, in_chans=train.in_chans,
                              **spec["model_kwargs"])
    began = time.perf_counter()
    history = train_detector(model, train, DetectTrainConfig(**spec["train"]), eval_data=val.subset(300),
                             progress=progress)
    minutes = (time.perf_counter() - began) / 60
    path.parent.mkdir(parents=True, exist_ok=True)
    repq.save_checkpoint(path, model, detector_spec=spec, history=history, train_minutes=minutes,
                         data=spec["data"], machine=machine())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated detector names (default: all)")
    args = parser.parse_args()
    names = [n for n in (args.only.split(",") if args.only else (QUICK if args.quick else DETECTORS))]
    for name in names:
        path = detector_checkpoint(name, args.quick)
        model, payload = repq.load_checkpoint(path)
        val = load_detection(payload["detector_spec"]["data"], "test")
        metrics = evaluate_detection(model, val)
        print(f"{name}: mAP@0.5:0.95 {metrics['map']:.2f}  mAP@0.5 {metrics['map50']:.2f}  "
              f"trained in {payload['train_minutes']:.1f} min  ({path})", flush=True)


if __name__ == "__main__":
    main()

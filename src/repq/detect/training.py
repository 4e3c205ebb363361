"""Training and evaluation of the detector: SGD (YOLOv6's momentum and decay) with warmup and a cosine schedule,
an exponential moving average of the weights (torch's AveragedModel, decay ramped up as in YOLO), the YOLOv6 loss;
evaluation by COCO mAP. Runs in one process or under torchrun (DDP), like `repq.train`."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from repq.checkpoint import save_checkpoint
from repq.data.detection import DetectionDataset
from repq.detect.boxes import postprocess
from repq.detect.loss import DetectionLoss, prediction_distillation
from repq.detect.metrics import coco_map
from repq.errors import RepqError
from repq.training import TrainingRun, _lr_factor


@dataclass
class DetectTrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.02
    momentum: float = 0.937
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    augment: bool = True
    seed: int = 0
    ema_decay: float = 0.9998   # 0 disables the weight average
    ema_tau: float = 500.0      # steps over which the decay ramps up from 0
    max_steps_per_epoch: int | None = None
    amp: str | None = None
    distill: float = 0.0        # weight of the teacher's prediction distillation (needs a teacher; QAT: the FP model)


def _ema(model: nn.Module, decay: float, tau: float) -> torch.optim.swa_utils.AveragedModel:
    def average(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        if not averaged[0].is_floating_point():   # BN's num_batches_tracked: follow the model
            torch._foreach_copy_(averaged, current)
            return
        d = decay * (1.0 - math.exp(-float(num_averaged) / tau))
        torch._foreach_lerp_(averaged, current, 1.0 - d)
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=average, use_buffers=True)


def train_detector(model: nn.Module, data: DetectionDataset, config: DetectTrainConfig | None = None,
                   eval_data: DetectionDataset | None = None, out: str | None = None, resume: str | None = None,
                   progress: bool = True, checkpoint_extra: dict[str, Any] | None = None,
                   teacher: nn.Module | None = None) -> dict[str, Any]:
    """Train `model` in place (its weights end as the moving average when `ema_decay` > 0); returns the history
    (per-step loss, per-epoch mAP). With `out`, a resumable checkpoint is written after every epoch. With a
    `teacher` and `config.distill` > 0, the loss adds the teacher's prediction distillation (QAT from the FP
    model: `prediction_distillation`)."""
    config = config or DetectTrainConfig()
    if config.distill < 0:
        raise RepqError(f"distill must be >= 0, got {config.distill}")
    if config.distill > 0 and teacher is None:
        raise RepqError("distill > 0 needs a teacher model (for QAT: the float detector)")
    if getattr(model, "num_classes", data.num_classes) != data.num_classes:
        raise RepqError(f"the data has {data.num_classes} classes but the detector has {model.num_classes}; build it "
                        "with num_classes matching the data")
    criterion = DetectionLoss(data.num_classes, getattr(model, "strides", (8, 16, 32)))
    run = TrainingRun.start(model, len(data), config, resume, nesterov=True)
    if teacher is not None and config.distill > 0:
        teacher = teacher.to(run.device).eval()
    else:
        teacher = None
    ema = _ema(model, config.ema_decay, config.ema_tau) if config.ema_decay > 0 else None   # after the resume
    device, rank, world, optimizer, scaler, net = run.device, run.rank, run.world, run.optimizer, run.scaler, run.net
    steps_per_epoch, history = run.steps_per_epoch, run.history
    if ema is not None and run.resumed is not None and "ema" in run.resumed:
        ema.module.load_state_dict(run.resumed["ema"])
        ema.n_averaged.fill_(run.resumed.get("ema_updates", 0))
    for epoch in range(run.start_epoch, config.epochs):
        net.train()
        began = time.perf_counter()
        batches = data.batches(config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch,
                               augment=config.augment, rank=rank, world_size=world)
        bar = run.progress_bar(progress, epoch, config.epochs)
        seen = 0
        parts = {"cls": 0.0, "box": 0.0}
        for step, (images, targets) in enumerate(batches):
            if step >= steps_per_epoch:
                break
            for group in optimizer.param_groups:
                group["lr"] = config.lr * max(0.01, _lr_factor(epoch * steps_per_epoch + step, run.total_steps,
                                                               run.warmup))
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.use_amp):
                outputs = net(images)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_outputs = teacher(images)
            loss, info = criterion(outputs, targets)
            if teacher is not None:
                distilled = prediction_distillation(outputs, teacher_outputs, data.num_classes)
                loss = loss + config.distill * distilled
                info["distill"] = float(distilled.detach())
            if not torch.isfinite(loss.detach()):
                raise RepqError(f"training diverged (loss {float(loss.detach())}) at epoch {epoch + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(model)
            history["loss"].append(float(loss.detach()))
            seen += len(images)
            for k in parts:
                parts[k] += info[k]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", pos=info["positives"])
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - began
        history["seconds"] += seconds
        steps = max(1, min(steps_per_epoch, step + 1))
        record = {"epoch": epoch + 1, "loss": sum(history["loss"][-steps:]) / steps,
                  "cls_loss": parts["cls"] / steps, "box_loss": parts["box"] / steps, "seconds": seconds,
                  "images_per_s": seen * world / max(seconds, 1e-9)}
        evaluated = ema.module if ema is not None else model
        if eval_data is not None and rank == 0:
            record.update({k: v for k, v in evaluate_detection(evaluated, eval_data).items()
                           if k in ("map", "map50")})
        history["epochs"].append(record)
        if progress and rank == 0 and not sys.stderr.isatty():   # logs have no progress bar: one line per epoch
            print(f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.3f}, "
                  + (f"val mAP {record['map']:.2f} (mAP@0.5 {record['map50']:.2f}), " if "map" in record else "")
                  + f"{record['images_per_s']:.0f} images/s", file=sys.stderr, flush=True)
        if out and rank == 0:
            train_state = {"epoch": epoch + 1, "optimizer": optimizer.state_dict(), "history": history,
                           "config": asdict(config)}
            if ema is not None:
                train_state.update(ema=ema.module.state_dict(), ema_updates=int(ema.n_averaged))
            save_checkpoint(out, _with_weights(model, evaluated), train_state=train_state, **(checkpoint_extra or {}))
    if ema is not None:
        model.load_state_dict(ema.module.state_dict())
    return history


def _with_weights(model: nn.Module, source: nn.Module) -> nn.Module:
    """`model` itself when `source` is it, else a copy of `model` holding `source`'s weights (the EMA)."""
    if source is model:
        return model
    import copy
    twin = copy.deepcopy(model)
    twin.load_state_dict(source.state_dict())
    return twin


@torch.no_grad()
def predict(model: nn.Module | Callable, images: Tensor, num_classes: int, strides=(8, 16, 32),
            conf_threshold: float = 0.001, iou_threshold: float = 0.65, max_det: int = 100) -> list[Tensor]:
    """Detections (x1, y1, x2, y2, score, class) per image of any detector module or callable."""
    return postprocess(model(images), num_classes, strides, conf_threshold, iou_threshold, max_det)


@torch.no_grad()
def evaluate_detection(model: nn.Module | Callable, data: DetectionDataset, batch_size: int = 32,
                       progress: bool = False, conf_threshold: float = 0.001, iou_threshold: float = 0.65,
                       max_det: int = 100, on_outputs: Callable[[int, list[Tensor]], None] | None = None
                       ) -> dict[str, float]:
    """{"map": mAP@0.5:0.95 %, "map50": mAP@0.5 %, "n": images, "seconds", "model_seconds", "images_per_s"}
    of a detector (module, quantized module, or a callable such as an ONNX Runtime wrapper) on `data`.
    `on_outputs(batch_index, raw level maps)` sees every batch's outputs (to compare two runtimes in one pass)."""
    is_module = isinstance(model, nn.Module)
    was_training = model.training if is_module else False
    first = next(model.parameters(), None) if is_module else None
    device = first.device if first is not None else torch.device("cpu")
    strides = getattr(model, "strides", (8, 16, 32))
    if is_module:
        model.eval()
    truths, detections, model_seconds = [], [], 0.0
    began = time.perf_counter()
    batches = data.batches(batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=math.ceil(len(data) / batch_size), desc="eval", leave=False, unit="batch",
                       disable=None)
    try:
        for index, (images, targets) in enumerate(batches):
            start = time.perf_counter()
            outputs = [o.float().cpu() for o in model(images.to(device))]
            model_seconds += time.perf_counter() - start
            if on_outputs is not None:
                on_outputs(index, outputs)
            detections += postprocess(outputs, data.num_classes, strides, conf_threshold, iou_threshold, max_det)
            truths += targets
    finally:
        if is_module:
            model.train(was_training)
    if not truths:
        raise RepqError("evaluation data is empty")
    scores = coco_map(truths, detections, data.num_classes)
    return {**scores, "n": len(truths), "seconds": time.perf_counter() - began, "model_seconds": model_seconds,
            "images_per_s": len(truths) / max(model_seconds, 1e-9)}

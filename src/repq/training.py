"""Training of the multi-branch (or any) model: SGD + cosine schedule, label smoothing, seeded, resumable.

Runs in one process or under `torchrun` (DDP: gloo on CPU, nccl on GPU); each rank reads its shard of every epoch's
permutation and only rank 0 logs and writes checkpoints.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from repq.checkpoint import load_into, read_checkpoint, save_checkpoint
from repq.data.datasets import ImageDataset
from repq.data.streaming import StreamingImageDataset
from repq.errors import RepqError
from repq.evaluation import evaluate


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 0.0
    augment: bool = True
    seed: int = 0
    max_steps_per_epoch: int | None = None   # cut epochs short (smoke tests, quick benchmarks)
    amp: str | None = None                    # None | "bf16" | "fp16": autocast on CUDA (fp16 with a grad scaler)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on BN parameters and biases (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def distributed_context(device: torch.device | None = None) -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun: nccl with each rank on its own
    GPU (LOCAL_RANK) when the model is on CUDA (or, with no device given, when CUDA exists); gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if on_gpu else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class TrainingRun:
    """What both training loops (classifier and detector) set up the same way: the SGD optimizer, the step
    schedule, the resumed state, mixed precision, DDP, and the per-epoch progress bar."""
    device: torch.device
    rank: int
    world: int
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    total_steps: int
    warmup: int
    history: dict[str, Any]
    start_epoch: int
    resumed: dict[str, Any] | None
    use_amp: bool
    amp_dtype: torch.dtype
    scaler: torch.amp.GradScaler
    net: nn.Module

    @classmethod
    def start(cls, model: nn.Module, data_len: int, config: Any, resume: str | None, nesterov: bool
              ) -> "TrainingRun":
        if config.epochs < 1 or config.batch_size < 1:
            raise RepqError(f"epochs and batch size must be at least 1 (got {config.epochs} and "
                            f"{config.batch_size})")
        if config.amp not in (None, "bf16", "fp16"):
            raise RepqError(f"amp must be None, 'bf16' or 'fp16', not {config.amp!r}")
        device = next(model.parameters()).device          # batches follow the model (repq train --device)
        rank, world = distributed_context(device)
        torch.manual_seed(config.seed)
        optimizer = torch.optim.SGD(_param_groups(model, config.weight_decay), lr=config.lr,
                                    momentum=config.momentum, nesterov=nesterov)
        steps_per_epoch = math.ceil(data_len // world / config.batch_size)
        if config.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
        history: dict[str, Any] = {"loss": [], "epochs": [], "seconds": 0.0}
        start_epoch, resumed = 0, None
        if resume:
            state = read_checkpoint(resume)
            if "train_state" not in state:
                raise RepqError(f"{resume} has no training state to resume from (it is a {state['kind']} "
                                "checkpoint)")
            load_into(model, resume, state)  # one-line error when the architecture or class count differs
            resumed = state["train_state"]
            optimizer.load_state_dict(resumed["optimizer"])
            history, start_epoch = resumed["history"], resumed["epoch"]
        use_amp = config.amp is not None and device.type == "cuda"
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                  else None) if world > 1 else model
        return cls(device, rank, world, optimizer, steps_per_epoch, steps_per_epoch * config.epochs,
                   int(config.warmup_epochs * steps_per_epoch), history, start_epoch, resumed, use_amp,
                   torch.bfloat16 if config.amp == "bf16" else torch.float16,
                   torch.amp.GradScaler("cuda", enabled=use_amp and config.amp == "fp16"), net)

    def progress_bar(self, progress: bool, epoch: int, epochs: int):
        """A tqdm bar for rank 0 (None elsewhere or without `progress`)."""
        if not progress or self.rank != 0:
            return None
        from tqdm import tqdm
        return tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False,
                    disable=None)


def train(model: nn.Module, data: ImageDataset | StreamingImageDataset, config: TrainConfig | None = None, eval_data: Any = None,
          out: str | None = None, resume: str | None = None, progress: bool = True,
          checkpoint_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `model` in place; returns the history (per-step loss, per-epoch accuracy, seconds). With `out`, a
    resumable checkpoint (plus the `checkpoint_extra` entries) is written after every epoch."""
    if getattr(data, "task", None) == "detect":
        raise RepqError("repq.train trains classifiers; train a detector with repq.train_detector(model, data, "
                        "repq.DetectTrainConfig(...))")
    config = config or TrainConfig()
    head = getattr(model, "linear", None)
    if isinstance(head, nn.Linear) and head.out_features != data.num_classes:
        raise RepqError(f"the data has {data.num_classes} classes but the model has {head.out_features}; "
                        "build the model with num_classes matching the data")
    run = TrainingRun.start(model, len(data), config, resume, nesterov=config.momentum > 0)
    device, rank, world, optimizer, scaler, net = run.device, run.rank, run.world, run.optimizer, run.scaler, run.net
    steps_per_epoch, history = run.steps_per_epoch, run.history
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    for epoch in range(run.start_epoch, config.epochs):
        net.train()
        began = time.perf_counter()
        batches = data.batches(config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch,
                               augment=config.augment, rank=rank, world_size=world)
        bar = run.progress_bar(progress, epoch, config.epochs)
        seen = correct = 0
        for step, (images, labels) in enumerate(batches):
            if step >= steps_per_epoch:
                break
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _lr_factor(epoch * steps_per_epoch + step, run.total_steps, run.warmup)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.use_amp):
                logits = net(images)
                loss = criterion(logits, labels)
            loss_value = loss.detach()
            if not torch.isfinite(loss_value):
                raise RepqError(f"training diverged (loss {float(loss_value)}) at epoch {epoch + 1}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            history["loss"].append(float(loss_value))
            seen += len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss_value):.3f}", acc=f"{100.0 * correct / seen:.1f}")
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - began
        history["seconds"] += seconds
        record = {"epoch": epoch + 1, "train_top1": 100.0 * correct / max(1, seen), "seconds": seconds,
                  "images_per_s": seen * world / max(seconds, 1e-9)}
        if eval_data is not None and rank == 0:
            record["eval_top1"] = evaluate(model, eval_data)["top1"]
        history["epochs"].append(record)
        if out and rank == 0:
            save_checkpoint(out, model, train_state={"epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                                                     "history": history, "config": asdict(config)},
                            **(checkpoint_extra or {}))
    return history

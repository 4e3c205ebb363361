"""Checks the command line runs before any expensive work: argument types with ranges, input and output paths,
and whether the data matches what a checkpoint was trained on. Each failure is a RepqError (or an argparse
error) that the CLI prints as one `repq CMD: error: ...` line with exit code 2."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Callable

from repq.errors import RepqError
from repq.io import input_file_problem


class CheckFailed(RepqError):
    """A requested check ran and failed (`export --verify`, `eval --min-top1`): exit code 1, not a user mistake."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (`repq CMD: error: ...`, exit 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------- argument types
def _number(kind: Callable[[str], Any], name: str, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got '{text}'") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be {'<' if high_open else '<='} {high}, got {text}")
        return value
    parse.__name__ = name
    return parse


positive_int = _number(int, "a positive integer", 1)
nonnegative_int = _number(int, "an integer >= 0", 0)
positive_float = _number(float, "a positive number", 0, low_open=True)
nonnegative_float = _number(float, "a number >= 0", 0)
fraction = _number(float, "a number in [0, 1)", 0, 1, high_open=True)
bit_width = _number(int, "a bit-width (2 to 16)", 2, 16)
image_size = _number(int, "an image size (8 to 4096 pixels)", 8, 4096)
crop_fraction = _number(float, "a crop fraction in (0, 1]", 0, 1, low_open=True)


def channel_values(text: str) -> tuple[float, ...]:
    """1 or 3 comma-separated finite numbers (a per-channel mean or std on the 0..1 scale)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 1 or 3 comma-separated numbers, got '{text}'") from None
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected 1 or 3 comma-separated finite numbers, got '{text}'")
    return values


# ---------------------------------------------------------------- paths
def check_input_file(path: str | None, flag: str) -> None:
    if path is None:
        return
    problem = input_file_problem(path)
    if problem == "is empty":
        raise RepqError(f"{flag} is empty; give the path of a file")
    if problem:
        raise RepqError(f"{flag} {path} {problem}; " + ("give the path of a file" if problem == "is a directory"
                                                         else "check the path"))


def _writable_folder(folder: Path, flag: str, path: str) -> None:
    """The nearest existing ancestor of `folder` must be a writable directory (repq creates the rest)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RepqError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RepqError(f"{flag} {path}: cannot write in {existing} (permission denied); choose another place")


def check_output_file(path: str | None, flag: str, inputs: tuple[str | None, ...] = (),
                      overwrite: bool = False) -> None:
    """A file repq will write: not empty, not a folder, not one of the inputs, in a writable place; an existing
    file only with --overwrite, and never a read-only one."""
    if path is None:
        return
    if not str(path).strip():
        raise RepqError(f"{flag} is empty; give a file name")
    p = Path(path)
    if str(path).endswith(("/", os.sep)) or p.is_dir():
        raise RepqError(f"{flag} {path} is a folder; give a file name (e.g. {Path(path) / 'model.pt'})")
    for inp in inputs:
        if inp and p.resolve() == Path(inp).resolve():
            raise RepqError(f"{flag} {path} is also an input; write to a new file (inputs are never overwritten)")
    _writable_folder(p.parent, flag, path)
    if p.exists():
        if not os.access(p, os.W_OK) or not p.stat().st_mode & 0o222:   # mode bits too: root ignores them
            raise RepqError(f"{flag} {path} exists and is read-only; repq will not replace it")
        if not overwrite:
            raise RepqError(f"{flag} {path} exists; add --overwrite to replace it, or choose a new name")


def check_output_folder(path: str | None, flag: str, overwrite: bool = False) -> None:
    """A folder repq will write files into: not a file; an existing non-empty folder only with --overwrite."""
    if path is None:
        return
    if not str(path).strip():
        raise RepqError(f"{flag} is empty; give a folder name")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RepqError(f"{flag} {path} is a file; give a folder name")
    _writable_folder(p, flag, path)
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise RepqError(f"{flag} {path} exists and is not empty; add --overwrite to write into it, or choose a "
                        "new folder")


# ---------------------------------------------------------------- data
def data_meta(data: Any) -> dict[str, Any]:
    """What a checkpoint records about the data it was trained / calibrated on."""
    meta = {"name": data.name, "input_size": list(data.input_size), "mean": [float(m) for m in data.mean],
            "std": [float(s) for s in data.std], "classes": [str(c) for c in data.classes]}
    transform = getattr(data, "transform", None)
    if transform is not None:   # streamed data: how images become inputs, reused by later commands
        meta["transform"] = {"size": transform.size, "crop_pct": transform.crop_pct,
                             "interpolation": transform.interpolation}
    return meta


def check_data_matches(payload: dict[str, Any], data: Any, allow_mismatch: bool) -> None:
    """Refuse data other than what the checkpoint recorded (name, input size, normalization, classes)."""
    recorded = payload.get("data_meta")
    if not recorded or allow_mismatch:
        return
    given = data_meta(data)
    differ = [k for k in ("name", "input_size", "classes") if recorded.get(k) != given[k]]
    if any(abs(a - b) > 1e-6 for k in ("mean", "std") for a, b in zip(recorded.get(k, []), given[k])):
        differ.append("normalization")
    if differ:
        what = ", ".join(f"{k} {recorded.get(k) if k != 'normalization' else ''} vs {given.get(k, '')}".strip()
                         if k in ("name", "input_size") else k for k in differ)
        raise RepqError(f"--data does not match the data the checkpoint was made with ({what}); pass that data, "
                        "or add --allow-data-mismatch")


# ---------------------------------------------------------------- devices
def resolve_device(text: str, flag: str = "--device", amp: str | None = None):
    """auto (CUDA when present, else CPU) | cpu | cuda | cuda:N, checked against what this machine has; under
    torchrun a bare `cuda` means this rank's GPU (LOCAL_RANK). `amp` (--amp) needs CUDA."""
    device = _device(text, flag)
    if amp and device.type != "cuda":
        raise RepqError(f"--amp {amp} needs a CUDA device (--device cuda); on CPU repq trains in float32")
    return device


def _device(text: str, flag: str):
    import torch
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise RepqError(f"{flag} {text}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise RepqError(f"{flag} {text}: repq runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise RepqError(f"{flag} {text}: no CUDA device is available on this machine; use --device cpu (or auto)")
    index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise RepqError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)

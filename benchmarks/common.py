"""Shared pieces of the benchmark scripts: the cached reference model, the machine line, table writing."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import repq  # noqa: E402
from repq.io import atomic_write_text  # noqa: E402

RESULTS = ROOT / "docs" / "results"
CACHE = Path(os.environ.get("REPQ_CACHE", ROOT / "runs"))

# What repq's PTQ default adds to a calibrator since 2026-12: activation equalization, the affine input grid and, below
# 8 bits, 8-bit edge layers. Rows that name a single method turn them off (METHOD_ONLY; PLAIN: bias correction too),
# so that they measure what their label says and the tables recorded before that change stay reproducible.
METHOD_ONLY = {"equalize": False, "input_activation": "minmax", "edge_bits": None}
PLAIN = {**METHOD_ONLY, "bias_correction": False}

# The reference model of the PTQ / QAT / export benchmarks: RepVGG-A0 (full width, ImageNet stem) on Fashion-MNIST.
REFERENCE = {"model": "repvgg_a0", "model_kwargs": {"num_classes": 10, "in_chans": 1, "small_input": False},
             "data": "fashion-mnist", "train": {"epochs": 6, "batch_size": 128, "lr": 0.1, "weight_decay": 1e-4,
                                                "label_smoothing": 0.1, "seed": 0}}
QUICK_REFERENCE = {"model": "repvgg_a0", "model_kwargs": {"num_classes": 10, "in_chans": 1, "small_input": True,
                                                          "width_scale": 0.25},
                   "data": "digits", "train": {"epochs": 15, "batch_size": 64, "lr": 0.05, "seed": 0}}
# OABN-trained twins of each reference (same recipe and seed, methods.md section 4): "fixed" is repq's default
# (identity branch, |t0| <= 1); "relative" bounds the identity and 1x1 folded scales by twice the largest tap of the
# block's folded 3x3 branch.
OABN_VARIANTS = {"fixed": {"branches": "identity", "rule": "fixed", "tau": 1.0},
                 "relative": {"branches": "identity+1x1", "rule": "relative", "k": 2.0}}


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {date.today().isoformat()}")


def cpu_line() -> str:
    """The CPU's model name and whether it has VNNI (from /proc/cpuinfo where there is one)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU: unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    vnni = sorted(flags & {"avx512_vnni", "avx_vnni"})
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    return f"CPU: {name}, {isa}, " + (f"VNNI ({', '.join(vnni)})" if vnni else "no VNNI")


def reference_spec(quick: bool = False, oabn: str | None = None) -> dict:
    """The reference recipe; `oabn` names an entry of OABN_VARIANTS (None: plain BN)."""
    spec = QUICK_REFERENCE if quick else REFERENCE
    if oabn is None:
        return spec
    return {**spec, "model_kwargs": {**spec["model_kwargs"], "oabn": OABN_VARIANTS[oabn]}}


def reference_checkpoint(quick: bool = False, progress: bool = True, oabn: str | None = None) -> Path:
    """The trained reference checkpoint (plain BN, or an OABN variant in the blocks), trained once and cached
    under runs/ (REPQ_CACHE)."""
    spec = reference_spec(quick, oabn)
    path = CACHE / (("reference_quick" if quick else "reference_fmnist_a0") + (f"_oabn_{oabn}" if oabn else "")
                    + ".pt")
    if path.exists():
        payload = repq.checkpoint.read_checkpoint(path)
        if payload.get("reference_spec") == spec:
            return path
    # torch 2.13 starts each process from a random seed, so the initialization is seeded here (the OABN twins then
    # start from the plain model's weights); TrainConfig.seed fixes data order and augmentation. The checkpoints
    # cached in runs/ before this seeding started from unseeded initializations (docs/results/README.md).
    torch.manual_seed(spec["train"]["seed"])
    model = repq.create_model(spec["model"], **spec["model_kwargs"])
    train_ds = repq.load_dataset(spec["data"], "train")
    test_ds = repq.load_dataset(spec["data"], "test")
    history = repq.train(model, train_ds, repq.TrainConfig(**spec["train"]), eval_data=test_ds, progress=progress)
    repq.save_checkpoint(path, model, reference_spec=spec, history=history)
    return path


def kernel_counts(path: Path) -> dict[str, int]:
    """Convs and adds of ONNX Runtime's optimized graph: fused integer convs (QLinearConv), unfused integer convs
    (ConvInteger + float epilogue), integer adds (QLinearAdd) and float convs."""
    from repq.export import integer_kernels
    k = integer_kernels(path)
    return {"QLinearConv": k.get("QLinearConv", 0), "ConvInteger": k.get("ConvInteger", 0),
            "QLinearAdd": k.get("QLinearAdd", 0),
            "float_convs": sum(k.get(op, 0) for op in ("Conv", "FusedConv", "NchwcConv"))}


def interleaved_throughput(paths: dict[str, Path], input_shape: list[int], batch: int, seconds: float,
                           repeats: int = 3) -> dict[str, float]:
    """ONNX Runtime images/s of every model (repq's sessions, 2 threads), the median of `repeats` rounds that each
    time every model once in turn: a slow spell of the machine then hits every model alike instead of one."""
    import statistics

    from repq.export.bench import throughput
    runs: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(repeats):
        for label, path in paths.items():
            runs[label].append(throughput(path, input_shape, batch, seconds, threads=2))
    return {label: statistics.median(v) for label, v in runs.items()}


def write_result(name: str, markdown: str, data: dict) -> None:
    """docs/results/NAME.md (table + command + machine) and NAME.json, written atomically."""
    atomic_write_text(RESULTS / f"{name}.md", markdown)
    atomic_write_text(RESULTS / f"{name}.json", json.dumps(data, indent=2))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


__all__ = ["CACHE", "METHOD_ONLY", "PLAIN", "OABN_VARIANTS", "QUICK_REFERENCE", "REFERENCE", "RESULTS", "machine", "reference_checkpoint",
           "reference_spec", "repq", "timed", "write_result"]

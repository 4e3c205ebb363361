"""Run an exported model in ONNX Runtime, and read which kernels its optimized graph uses."""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from repq.errors import RepqError


def _session(path: str | os.PathLike, optimized_out: str | None = None, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise RepqError("verification needs onnxruntime: pip install 'repq[export]'") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the optimized-graph dump warns that it is hardware specific: we only read it
    if threads:
        options.intra_op_num_threads = threads
    if optimized_out:
        options.optimized_model_filepath = optimized_out
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path: str | os.PathLike, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of the ONNX model on `images` (N, C, H, W float32)."""
    session = _session(path)
    outs = [session.run(["logits"], {"input": images[i:i + batch_size].astype(np.float32)})[0]
            for i in range(0, len(images), batch_size)]
    return np.concatenate(outs)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean() * 100)


def verify_against_simulation(model, path: str | os.PathLike, images: np.ndarray, labels: np.ndarray,
                              batch_size: int = 500, progress: bool = False) -> dict[str, float]:
    """Top-1 of repq's simulation and of ONNX Runtime on the same images, and how far their logits differ."""
    import torch

    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="simulation", unit="batch", leave=False, disable=None)
    with torch.no_grad():
        sim = torch.cat([model(torch.from_numpy(images[i:i + batch_size])) for i in starts]).numpy()
    ort = run_onnx(path, images)
    return {"n": len(labels), "top1_repq": top1(sim, labels), "top1_onnxruntime": top1(ort, labels),
            "max_logit_diff": float(np.abs(ort - sim).max()), "logit_scale": float(np.abs(sim).max()),
            "argmax_agreement": float((ort.argmax(1) == sim.argmax(1)).mean() * 100)}


def integer_kernels(path: str | os.PathLike) -> dict[str, int]:
    """Op counts of ONNX Runtime's optimized graph (QLinearConv / ConvInteger = integer convs; Conv = float)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = str(Path(tmp) / "optimized.onnx")
        _session(path, optimized_out=optimized)
        graph = onnx.load(optimized).graph
    return dict(Counter(node.op_type for node in graph.node))

"""Run an exported model in ONNX Runtime, and read which kernels its optimized graph uses."""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from repq.errors import RepqError


# The ONNX Runtime session option that keeps u8 x s8 integer kernels exact on x64 CPUs without VNNI.
ORT_EXACT_U8S8 = ("session.x64quantprecision", "1")
# x64 CPUs without VNNI multiply u8 x s8 with an instruction that adds each pair of products in int16 and saturates.
# With every weight code within +-64 a pair stays within 255 x 64 x 2 = 32640 < 2^15, whatever the pairing.
U8S8_EXACT_LIMIT = 64
_WEIGHT_INPUT = {"DequantizeLinear": 0, "ConvInteger": 1, "MatMulInteger": 1, "QLinearConv": 3, "QLinearMatMul": 3}


def largest_weight_code(path: str | os.PathLike) -> int:
    """The largest |code| of the int8 weights of an exported model (the constant int8 input of each
    DequantizeLinear, and the weight input of ConvInteger / MatMulInteger / QLinearConv / QLinearMatMul); 0 when
    it has none."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    initializers = {i.name: i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    largest = 0
    for node in graph.node:
        slot = _WEIGHT_INPUT.get(node.op_type)
        if slot is not None and len(node.input) > slot and node.input[slot] in initializers:
            codes = numpy_helper.to_array(initializers[node.input[slot]]).astype(np.int32)
            largest = max(largest, int(np.abs(codes).max(initial=0)))
    return largest


def _session(path: str | os.PathLike, optimized_out: str | None = None, threads: int | None = None,
             profile_prefix: str | None = None, exact_u8s8: bool = True):
    """An ONNX Runtime CPU session; `exact_u8s8` sets ORT_EXACT_U8S8. With it, on x64 CPUs without VNNI ONNX Runtime
    turns each int8 weight tensor with a code beyond +-64 into uint8 and runs it with slower u8 x u8 kernels
    (tensors within +-64 keep the fast kernels: they cannot saturate); elsewhere it changes nothing. False is for
    measuring the default kernels only (docs/results/saturation.md)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RepqError("verification needs onnxruntime: pip install 'repq[export]'") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # CFWS fills its codes to +-127, and on such a CPU (an AMD EPYC here) every fused conv test drifted from the
    # simulation by whole output steps without the option.
    if exact_u8s8:
        options.add_session_config_entry(ORT_EXACT_U8S8[0], ORT_EXACT_U8S8[1])
    options.log_severity_level = 3  # the optimized-graph dump warns that it is hardware specific: we only read it
    if threads:
        options.intra_op_num_threads = threads
    if optimized_out:
        options.optimized_model_filepath = optimized_out
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeModel:
    """An exported model run by ONNX Runtime, called like a module on a float tensor (for `repq.evaluate`)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, exact_u8s8: bool = True) -> None:
        self.session = _session(path, threads=threads, exact_u8s8=exact_u8s8)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, images):
        """The logits tensor of a one-output model; a tuple of tensors for several outputs (a detector's levels)."""
        import torch
        array = images.detach().cpu().numpy().astype(np.float32, copy=False)
        outs = [torch.from_numpy(o) for o in self.session.run(self.outputs, {"input": array})]
        return outs[0] if len(outs) == 1 else tuple(outs)


def run_onnx(path: str | os.PathLike, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of the ONNX model on `images` (N, C, H, W float32)."""
    session = _session(path)
    outs = [session.run(["logits"], {"input": images[i:i + batch_size].astype(np.float32)})[0]
            for i in range(0, len(images), batch_size)]
    return np.concatenate(outs)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean() * 100)


def verify_against_simulation(model, path: str | os.PathLike, data, labels: np.ndarray | None = None,
                              batch_size: int = 500, progress: bool = False) -> dict[str, float]:
    """Top-1 of repq's simulation and of ONNX Runtime on the same images, and how far their logits differ.
    `data` is an (N, C, H, W) array with `labels`, or anything repq.evaluate reads (a streamed dataset: the images
    are never all in memory)."""
    import torch

    from repq.data.batches import iter_batches

    if isinstance(data, np.ndarray):
        data = (torch.from_numpy(data), torch.from_numpy(np.asarray(labels)))
    session = OnnxRuntimeModel(path)
    batches = iter_batches(data, batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="simulation vs ONNX Runtime", unit="batch", leave=False, disable=None)
    n = hits_sim = hits_ort = agree = 0
    diffs, scales = [], []   # per-batch maxima; numpy's max keeps a NaN
    with torch.no_grad():
        for images, batch_labels in batches:
            sim = model(images.float()).float().cpu()
            ort = session(images)
            if batch_labels is None:
                raise RepqError("verification needs labelled images")
            n += len(batch_labels)
            hits_sim += int((sim.argmax(1) == batch_labels).sum())
            hits_ort += int((ort.argmax(1) == batch_labels).sum())
            agree += int((sim.argmax(1) == ort.argmax(1)).sum())
            diffs.append(float((ort - sim).abs().max()))
            scales.append(float(sim.abs().max()))
    if n == 0:
        raise RepqError("verification data is empty")
    return {"n": n, "top1_repq": 100.0 * hits_sim / n, "top1_onnxruntime": 100.0 * hits_ort / n,
            "max_logit_diff": float(np.max(diffs)), "logit_scale": float(np.max(scales)), "argmax_agreement": 100.0 * agree / n}


def integer_kernels(path: str | os.PathLike) -> dict[str, int]:
    """Op counts of ONNX Runtime's optimized graph (QLinearConv / ConvInteger = integer convs; Conv = float)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = str(Path(tmp) / "optimized.onnx")
        _session(path, optimized_out=optimized)
        graph = onnx.load(optimized).graph
    return dict(Counter(node.op_type for node in graph.node))

"""`repq export --bench`: which ONNX Runtime kernel each quantized layer became, and the exported model's
throughput against an FP32 twin of the same network (same architecture, the dequantized weights, no
quantization), both in ONNX Runtime on random inputs of the model's shape."""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from repq.export.verify import _session, largest_weight_code
from repq.quant.modules import QUANT_LAYERS, QuantGlobalAvgPool

KERNEL_ORDER = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "Conv", "Gemm", "MatMul")


@torch.no_grad()
def float_twin(qmodel: nn.Module) -> nn.Module:
    """The quantized model with each quantized layer replaced by a float Conv2d / Linear holding its dequantized
    weight and bias, and quantized pools by plain pools: the FP32 reference of the speed comparison."""
    twin = copy.deepcopy(qmodel).cpu().eval()
    for name, module in list(twin.named_modules()):
        if isinstance(module, QUANT_LAYERS):
            if isinstance(module, nn.Conv2d):
                plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                  module.padding, module.dilation, module.groups, bias=module.bias is not None)
            else:
                plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight.copy_(module.effective_weight())
            if module.bias is not None:
                plain.bias.copy_(module.effective_bias())
            twin.set_submodule(name, plain)
        elif isinstance(module, QuantGlobalAvgPool):
            twin.set_submodule(name, nn.AdaptiveAvgPool2d(1))
    return twin


def _layer_prefixes(layer_names: list[str]) -> list[tuple[str, str]]:
    """(node-name prefix, layer) pairs, longest prefix first: the exporter names every node after its module (dots
    become underscores), so a node belongs to the layer with the longest prefix it starts with."""
    return sorted(((n.replace(".", "_") + "_", n) for n in layer_names), key=lambda p: -len(p[0]))


def _owner(node_name: str, prefixes: list[tuple[str, str]]) -> str | None:
    return next((layer for prefix, layer in prefixes if node_name.startswith(prefix)), None)


def layer_kernels(optimized_nodes: list[Any], layer_names: list[str]) -> dict[str, str]:
    """For each quantized layer, the kind of kernel its nodes became after ONNX Runtime's graph optimization."""
    prefixes = _layer_prefixes(layer_names)
    ops: dict[str, set[str]] = {name: set() for name in layer_names}
    for node in optimized_nodes:
        owner = _owner(node.name, prefixes)
        if owner is not None:
            ops[owner].add(node.op_type)
    return {name: next((k for k in KERNEL_ORDER if k in kinds), "+".join(sorted(kinds)) or "?")
            for name, kinds in ops.items()}


def throughput(path: str | Path, input_shape: list[int], batch: int, seconds: float = 3.0,
               threads: int | None = None, exact_u8s8: bool = True) -> float:
    """Images/s of ONNX Runtime on random inputs: 2 warm-up runs, then runs until `seconds` (at least 3).
    `exact_u8s8`: as repq.export.verify._session (False: the default kernels, which may saturate)."""
    session = _session(path, threads=threads, exact_u8s8=exact_u8s8)
    x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
    name = session.get_inputs()[0].name
    for _ in range(2):
        session.run(None, {name: x})
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < seconds:
        session.run(None, {name: x})
        runs += 1
    return batch * runs / (time.perf_counter() - start)


def layer_times(path: str | Path, layer_names: list[str], input_shape: list[int], batch: int, runs: int = 10,
                threads: int | None = None) -> dict[str, float]:
    """Milliseconds per run that ONNX Runtime's profiler gives each layer's nodes (kernel times after graph
    optimization; the exporter names nodes after their module, and a fused QDQ conv keeps its conv's name),
    averaged over `runs` runs after 2 warm-up runs. A layer's nodes include the QuantizeLinear of its input and,
    for a two-branch CFWS layer, its QLinearAdd. "(other nodes)" holds the rest: pooling, layout transposes."""
    import json

    with tempfile.TemporaryDirectory(prefix="repq-profile-") as tmp:
        session = _session(path, threads=threads, profile_prefix=str(Path(tmp) / "profile"))
        x = np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)
        name = session.get_inputs()[0].name
        for _ in range(runs + 2):
            session.run(None, {name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    prefixes = _layer_prefixes(layer_names)
    times: dict[str, float] = dict.fromkeys([*layer_names, "(other nodes)"], 0.0)
    run, first = 0, kernels[0]["name"] if kernels else None
    for event in kernels:
        run += event["name"] == first      # the first node of the graph opens each run
        if run <= 2:
            continue
        node = event["name"][:-len("_kernel_time")]
        layer = _owner(node, prefixes) or "(other nodes)"
        times[layer] += event["dur"] / 1000.0
    return {k: v / max(1, run - 2) for k, v in times.items()}


def bench(qmodel: nn.Module, path: str | Path, example: torch.Tensor, batches: tuple[int, ...] = (64, 1),
          seconds: float = 3.0) -> dict[str, Any]:
    """Kernels per quantized layer, images/s of the exported model vs its FP32 twin at each batch size (sessions
    with ORT_EXACT_U8S8, as repq verifies the model), and the
    time of each layer of the exported model at the largest batch. (Not of the twin: ONNX Runtime renames a float
    conv fused with its activation after the activation, so its nodes cannot be told apart by name.)"""
    import onnx

    from repq.export.onnx_qdq import export_onnx
    layer_names = [n for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)]
    shape = list(example.shape[1:])
    with tempfile.TemporaryDirectory(prefix="repq-bench-") as tmp:
        optimized = str(Path(tmp) / "optimized.onnx")
        _session(path, optimized_out=optimized)
        kernels = layer_kernels(list(onnx.load(optimized).graph.node), layer_names)
        fp32 = export_onnx(float_twin(qmodel), Path(tmp) / "fp32.onnx", example.cpu(), allow_float=True)
        speed = {b: {"model": throughput(path, shape, b, seconds), "fp32": throughput(fp32, shape, b, seconds)}
                 for b in batches}
        batch = max(batches)
        times = layer_times(path, layer_names, shape, batch)
    for entry in speed.values():
        entry["ratio"] = entry["model"] / entry["fp32"]
    counts: dict[str, int] = {}
    for kind in kernels.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {"layers": kernels, "kernel_counts": counts, "images_per_s": speed, "input_shape": shape,
            "largest_weight_code": largest_weight_code(path),
            "layer_ms": {"batch": batch, "layers": times}}

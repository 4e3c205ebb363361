"""QDQ ONNX export: the graph ONNX Runtime turns into integer kernels.

The model is traced with torch.fx; each call becomes ONNX nodes. A quantized layer becomes
    Q(x) -> DQ -> Conv(DQ(int8 W), DQ(int32 b))            (+ Conv(DQ(int8 coarse center), 1x1) -> Add for CFWS)
so the integer codes and scales of the simulation are written as they are (no re-quantization happens in export).
Activations: unsigned codes as uint8 (zero point 0), signed codes as int8 (zero point 0), except at the input of a
fused conv, where signed codes c travel as uint8 c + 128 with zero point 128 (the same values): ONNX Runtime on x86
fuses QLinearConv only for uint8 inputs. Its u8 x s8 kernels may saturate int16 pair sums on CPUs without VNNI: the
fused convs take that risk, as ONNX Runtime's own quantize_static graphs do (parity is measured in the tests and
benchmarks), while the ConvInteger path keeps int8 inputs and stays exact.
A quantized global pool (PTQConfig.quantize_pool) is Q -> DQ -> GlobalAveragePool, so the last conv is fused too.
"""
from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from repq.errors import RepqError
from repq.io import atomic_write
from repq.quant.modules import (CODEBOOK_LAYERS, QUANT_LAYERS, QuantConv2d, QuantGlobalAvgPool,
                                is_global_avg_pool)

OPSET = 19
# modules with an activation quantizer on their input: each one is a QuantizeLinear in the graph
_QUANT_INPUTS = (*QUANT_LAYERS, QuantGlobalAvgPool)


class _GraphBuilder:
    def __init__(self) -> None:
        from onnx import helper, numpy_helper
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._count = 0

    def name(self, base: str) -> str:
        self._count += 1
        return f"{base.replace('.', '_')}_{self._count}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.name(base + "_" + op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _quantize_input(g: _GraphBuilder, layer: nn.Module, x: str, base: str,
                    signed_as_uint8: bool = False) -> tuple[str, str, str]:
    """QuantizeLinear of a layer's input: (codes, scale, zero point); `signed_as_uint8` stores signed codes c as
    uint8 c + 128. Codes narrower than 8 bits travel in the 8-bit container, behind a Clip to their own range
    (QuantizeLinear only clips to the container's)."""
    q = layer.input_quantizer
    if q.bits > 8:
        raise RepqError(f"ONNX export supports activations up to 8 bits; '{base}' has {q.bits}")
    scale_value = float(q.scale)
    scale = g.const(base + "_x_scale", np.array(scale_value, dtype=np.float32))
    if q.signed and not signed_as_uint8:
        zero = g.const(base + "_x_zero", np.array(0, dtype=np.int8))
    else:
        zero = g.const(base + "_x_zero", np.array(128 if q.signed else 0, dtype=np.uint8))
    if q.bits < 8:
        low = g.const(base + "_x_min", np.array(float(q.qmin) * scale_value, dtype=np.float32))
        high = g.const(base + "_x_max", np.array(float(q.qmax) * scale_value, dtype=np.float32))
        x = g.node("Clip", [x, low, high], base)
    return g.node("QuantizeLinear", [x, scale, zero], base), scale, zero


def _weight_codes(g: _GraphBuilder, codes: torch.Tensor, base: str) -> str:
    if codes.abs().max() > 127:
        raise RepqError(f"'{base}' has weight codes beyond int8; ONNX export supports w_bits <= 8")
    return g.const(base + "_w", codes.cpu().numpy().astype(np.int8))


def _bias_codes(layer: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """The layer's int32 bias codes and their scale, exactly as the simulation uses them."""
    codes, step = layer.bias_codes()
    return codes.detach().cpu().numpy().astype(np.int32), step.detach().cpu().numpy().astype(np.float32)


def _emit_qdq_layer(g: _GraphBuilder, layer: nn.Module, x: str, base: str) -> str:
    """Q -> DQ -> Conv/Gemm(DQ(int8 W), DQ(int32 b)): ONNX Runtime fuses it into QLinearConv / QGemm."""
    codes, s, z = _quantize_input(g, layer, x, base, signed_as_uint8=isinstance(layer, nn.Conv2d))
    xq = g.node("DequantizeLinear", [codes, s, z], base)
    w_scale = g.const(base + "_w_scale", layer.weight_scale.detach().cpu().numpy().astype(np.float32))
    w_zero = g.const(base + "_w_zero", np.zeros(layer.weight_scale.numel(), dtype=np.int8))
    w = g.node("DequantizeLinear", [_weight_codes(g, layer.weight_codes, base), w_scale, w_zero], base + "_w", axis=0)
    inputs = [xq, w]
    if layer.bias is not None:
        codes, step = _bias_codes(layer)
        b_args = [g.const(base + "_b", codes), g.const(base + "_b_scale", step),
                  g.const(base + "_b_zero", np.zeros(step.size, dtype=np.int32))]
        inputs.append(g.node("DequantizeLinear", b_args, base + "_b", axis=0))
    return _conv_or_gemm(g, layer, inputs, base)


def _emit_integer_conv(g: _GraphBuilder, layer: QuantConv2d, x: str, base: str) -> str:
    """Q -> ConvInteger (int32 accumulator) -> x per-channel scale (+ the CFWS coarse 1x1 ConvInteger) + bias.

    This is the CFWS execution of methods.md section 2, and the integer form of a conv whose output is not
    requantized (ONNX Runtime fuses only Q -> DQ -> Conv -> [Relu] -> Q into QLinearConv)."""
    xq, _, z = _quantize_input(g, layer, x, base)
    w_zero = g.const(base + "_w_zero", np.array(0, dtype=np.int8))
    in_scale = float(layer.input_quantizer.scale)

    def branch(codes: torch.Tensor, scale: torch.Tensor, attrs: dict[str, Any], name: str) -> str:
        acc = g.node("ConvInteger", [xq, _weight_codes(g, codes, name), z, w_zero], name, **attrs)
        rescale = (in_scale * scale.detach().cpu().numpy()).astype(np.float32).reshape(1, -1, 1, 1)
        return g.node("Mul", [g.node("Cast", [acc], name, to=1), g.const(name + "_scale", rescale)], name)

    out = branch(layer.weight_codes, layer.weight_scale, _conv_attrs(layer), base)
    if layer.coarse is not None:
        if layer.coarse == "center" and (layer.padding[0] != layer.kernel_size[0] // 2 or layer.dilation[0] != 1):
            raise RepqError(f"CFWS export of '{base}' needs 'same' padding and no dilation")
        attrs = _conv_attrs(layer, coarse_center=layer.coarse == "center")
        out = g.node("Add", [out, branch(layer.coarse_codes, layer.coarse_scale, attrs, base + "_coarse")], base)
    if layer.bias is not None:
        codes, step = _bias_codes(layer)
        bias = (codes.astype(np.float64) * step).astype(np.float32).reshape(1, -1, 1, 1)
        out = g.node("Add", [out, g.const(base + "_bias", bias)], base)
    return out


def _emit_codebook_layer(g: _GraphBuilder, layer: nn.Module, x: str, base: str) -> str:
    """Round(Clip(x) / s) * s -> Conv/Gemm with weights Gather(codebook, indices).

    The b-bit indices (uint8) and the codebook are initializers; ONNX Runtime folds the lookup into dequantized
    float weights when the session starts. The input's quantization is written with float ops, not Q/DQ: with a
    DQ input and constant float weights, ONNX Runtime would re-quantize those weights to a uniform int8 grid
    (its weight/bias quantization pass), which is not the codebook. A lookup-table runtime uses the side file of
    `codebook_tables` instead."""
    q = layer.input_quantizer
    if q.bits > 8:
        raise RepqError(f"ONNX export supports activations up to 8 bits; '{base}' has {q.bits}")
    scale = float(q.scale)
    low = g.const(base + "_x_min", np.array(float(q.qmin) * scale, dtype=np.float32))
    high = g.const(base + "_x_max", np.array(float(q.qmax) * scale, dtype=np.float32))
    s = g.const(base + "_x_scale", np.array(scale, dtype=np.float32))
    codes = g.node("Round", [g.node("Div", [g.node("Clip", [x, low, high], base), s], base)], base)
    xq = g.node("Mul", [codes, s], base)
    indices = g.const(base + "_w_indices", layer.weight_indices.cpu().numpy().astype(np.uint8))
    codebook = g.const(base + "_codebook", layer.codebook.detach().cpu().numpy().astype(np.float32))
    w = g.node("Gather", [codebook, g.node("Cast", [indices], base + "_w", to=6)], base + "_w", axis=0)
    return _conv_or_gemm(g, layer, [xq, w] + _float_bias(g, layer, base), base)


def _conv_attrs(conv: nn.Conv2d, coarse_center: bool = False) -> dict[str, Any]:
    kernel = [1, 1] if coarse_center else list(conv.kernel_size)
    pads = [0, 0, 0, 0] if coarse_center else [conv.padding[0], conv.padding[1]] * 2
    return dict(kernel_shape=kernel, strides=list(conv.stride), pads=pads, group=conv.groups,
                dilations=[1, 1] if coarse_center else list(conv.dilation))


def _emit_quant_layer(g: _GraphBuilder, layer: nn.Module, x: str, base: str, fusable: bool) -> str:
    """QDQ form where ONNX Runtime fuses it (8-bit input, output requantized by the next layer), else the
    explicit integer form; both compute the simulation's integer arithmetic."""
    if layer.w_bits > 8:
        raise RepqError(f"'{base}' has {layer.w_bits}-bit weights; ONNX export supports w_bits <= 8")
    if isinstance(layer, CODEBOOK_LAYERS):
        return _emit_codebook_layer(g, layer, x, base)
    if isinstance(layer, QuantConv2d) and (layer.coarse is not None or not fusable):
        return _emit_integer_conv(g, layer, x, base)
    return _emit_qdq_layer(g, layer, x, base)


def _emit_float_layer(g: _GraphBuilder, layer: nn.Module, x: str, base: str) -> str:
    w = g.const(base + "_w", layer.weight.detach().cpu().numpy().astype(np.float32))
    return _conv_or_gemm(g, layer, [x, w] + _float_bias(g, layer, base), base)


def _float_bias(g: _GraphBuilder, layer: nn.Module, base: str) -> list[str]:
    return [] if layer.bias is None else [g.const(base + "_b", layer.bias.detach().cpu().numpy().astype(np.float32))]


def _conv_or_gemm(g: _GraphBuilder, layer: nn.Module, inputs: list[str], base: str) -> str:
    if isinstance(layer, nn.Linear):
        return g.node("Gemm", inputs, base, transB=1)
    return g.node("Conv", inputs, base, **_conv_attrs(layer))


def _emit_module(g: _GraphBuilder, module: nn.Module, x: str, base: str, fusable: bool = False) -> str:
    if isinstance(module, QUANT_LAYERS):
        return _emit_quant_layer(g, module, x, base, fusable)
    if isinstance(module, QuantGlobalAvgPool):
        codes, s, z = _quantize_input(g, module, x, base)
        return g.node("GlobalAveragePool", [g.node("DequantizeLinear", [codes, s, z], base)], base)
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return _emit_float_layer(g, module, x, base)
    if isinstance(module, nn.ReLU):
        return g.node("Relu", [x], base)
    if is_global_avg_pool(module):
        return g.node("GlobalAveragePool", [x], base)
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return g.node("Flatten", [x], base, axis=1)
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return x
    if isinstance(module, nn.MaxPool2d):
        k = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 2
        s = module.stride if isinstance(module.stride, tuple) else (module.stride,) * 2
        p = module.padding if isinstance(module.padding, tuple) else (module.padding,) * 2
        return g.node("MaxPool", [x], base, kernel_shape=list(k), strides=list(s), pads=[p[0], p[1]] * 2)
    raise RepqError(f"ONNX export does not support layer {type(module).__name__} at '{base}'")


def _requantized_outputs(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> set[str]:
    """Nodes whose output reaches only 8-bit quantized inputs, directly or through one ReLU into unsigned ones
    (ORT's QDQ fusion pattern: it folds a ReLU into the Q after it only when the zero point is the range's bottom)."""
    def quantized_input(n: torch.fx.Node, after_relu: bool) -> bool:
        module = modules[n.target] if n.op == "call_module" else None
        if not isinstance(module, _QUANT_INPUTS):
            return False
        q = module.input_quantizer  # narrower codes put a Clip before the Q, which breaks the pattern too
        return q.bits == 8 and not (after_relu and q.signed)

    found = set()
    for node in graph.nodes:
        users, after_relu = list(node.users), False
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], nn.ReLU):
            users, after_relu = list(users[0].users), True
        if users and all(quantized_input(u, after_relu) for u in users):
            found.add(node.name)
    return found


def _is_flatten_from_dim1(node: torch.fx.Node) -> bool:
    """torch.flatten(x, 1) / x.flatten(1), which is ONNX Flatten(axis=1); flatten() (start_dim 0) is not."""
    is_flatten = (node.op == "call_function" and node.target is torch.flatten) or \
        (node.op == "call_method" and node.target == "flatten")
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return is_flatten and start == 1 and end == -1


def _leaf_tracer() -> torch.fx.Tracer:
    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, _QUANT_INPUTS) or super().is_leaf_module(m, qualname)
    return Tracer()


def build_onnx(model: nn.Module, example_input: torch.Tensor):
    """The ONNX ModelProto of `model` (quantized: QDQ; float: plain), batch dimension dynamic."""
    from onnx import TensorProto, helper

    try:
        graph = _leaf_tracer().trace(model)
    except Exception as exc:  # fx raises many types for dynamic control flow
        raise RepqError(f"cannot trace the model for export ({type(exc).__name__}); repq exports static graphs")
    modules = dict(model.named_modules())
    requantized = _requantized_outputs(graph, modules)
    g = _GraphBuilder()
    values: dict[str, str] = {}
    output = None
    for node in graph.nodes:
        if node.op == "placeholder":
            values[node.name] = "input"
        elif node.op == "call_module":
            values[node.name] = _emit_module(g, modules[node.target], values[node.args[0].name], node.target,
                                             fusable=node.name in requantized)
        elif _is_flatten_from_dim1(node):
            values[node.name] = g.node("Flatten", [values[node.args[0].name]], node.name, axis=1)
        elif node.op == "call_function" and node.target in (operator.add, torch.add):
            a, b = (values[arg.name] for arg in node.args[:2])
            values[node.name] = g.node("Add", [a, b], node.name)
        elif node.op == "call_function" and node.target in (torch.relu, nn.functional.relu):
            values[node.name] = g.node("Relu", [values[node.args[0].name]], node.name)
        elif node.op == "output":
            output = values[node.args[0].name]
        else:
            raise RepqError(f"ONNX export does not support '{node.op} {node.target}' in the traced graph")
    g.nodes.append(helper.make_node("Identity", [output], ["logits"], name="logits_identity"))
    shape = ["batch", *example_input.shape[1:]]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)]
    with torch.no_grad():
        classes = model(example_input[:1]).shape[-1]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])]
    onnx_graph = helper.make_graph(g.nodes, "repq", inputs, outputs, g.initializers)
    proto = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="repq")
    proto.ir_version = 9
    return proto


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor,
                allow_float: bool = False) -> Path:
    """Write `model` as ONNX (checked with onnx.checker, written atomically). A model from `repq.quantize` becomes
    a QDQ graph; a float model needs `allow_float=True` (the FP reference)."""
    try:
        import onnx
    except ImportError:
        raise RepqError("ONNX export needs the onnx package: pip install 'repq[export]'") from None
    quantized = any(isinstance(m, QUANT_LAYERS) for m in model.modules())
    if not quantized and not allow_float:
        raise RepqError("the model is not quantized; run repq.quantize first, or export the float model with --fp")
    model = model.eval()
    proto = build_onnx(model, example_input)
    onnx.checker.check_model(proto, full_check=True)
    tables = codebook_tables(model)
    if tables:
        atomic_write(codebook_path(path), lambda fh: np.savez(fh, **tables))
    return atomic_write(path, lambda fh: fh.write(proto.SerializeToString()))


LUT_NOTE = ("ClusterQAT layers: weight[i] = codebook[indices[i]] (indices uint8, shape of the weight; codebook "
            "float32, 2^b entries). A lookup-table runtime multiplies the quantized input codes by codebook entries "
            "picked by the b-bit indices (or precomputes codebook x input-level products per layer), accumulates, "
            "then scales by the input scale and adds the float bias. Runtimes without LUT kernels use the "
            "dequantized weights (what the ONNX graph computes).")


def codebook_path(onnx_path: str | os.PathLike) -> Path:
    path = Path(onnx_path)
    return path.with_name(path.stem + ".codebook.npz")


def codebook_tables(model: nn.Module) -> dict[str, np.ndarray]:
    """Indices + codebook (+ input scale and bits) of every codebook layer, for the side file next to the ONNX
    model; empty for models without codebook layers."""
    tables: dict[str, np.ndarray] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, CODEBOOK_LAYERS):
            tables[f"{name}.indices"] = layer.weight_indices.cpu().numpy().astype(np.uint8)
            tables[f"{name}.codebook"] = layer.codebook.detach().cpu().numpy().astype(np.float32)
            tables[f"{name}.input_scale"] = np.array(float(layer.input_quantizer.scale), dtype=np.float32)
            tables[f"{name}.bits"] = np.array([layer.w_bits, layer.input_quantizer.bits], dtype=np.int32)
    if tables:
        tables["note"] = np.array(LUT_NOTE)
    return tables

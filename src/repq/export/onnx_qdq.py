"""QDQ ONNX export: the graph ONNX Runtime turns into integer kernels.

The model is traced with torch.fx; each call becomes ONNX nodes. A quantized layer becomes
    Q(x) -> DQ -> Conv(DQ(int8 W), DQ(int32 b))            (+ Conv(DQ(int8 coarse center), 1x1) -> Add for CFWS)
so the integer codes and scales of the simulation are written as they are (no re-quantization happens in export).
Activations: unsigned codes as uint8 (zero point 0, or an affine grid's zero point from QATConfig.affine_activations),
signed codes as int8 (zero point 0), except at the input of a
fused conv, where signed codes c travel as uint8 c + 128 with zero point 128 (the same values): ONNX Runtime on x86
fuses QLinearConv only for uint8 inputs. Its u8 x s8 kernels may saturate int16 pair sums on CPUs without VNNI: the
fused convs take that risk, as ONNX Runtime's own quantize_static graphs do (parity is measured in the tests and
benchmarks), while the ConvInteger path keeps int8 inputs and stays exact.
A quantized global pool (PTQConfig.quantize_pool) is Q -> DQ -> GlobalAveragePool, so the last conv is fused too.
A two-branch CFWS layer (PTQConfig.cfws_deploy="two_branch") is two QDQ convs, each followed by Q -> DQ of its int8
output, and an Add: QLinearConv + QLinearConv + QLinearAdd in ONNX Runtime. With cfws_deploy="residual" only the
coarse conv's output is requantized and it enters the Add as the fine conv's residual input (TensorRT's layout).
Scalar scales and zero points are 0-d tensors: ONNX Runtime fuses Add into QLinearAdd only for those.
"""
from __future__ import annotations

import json
import operator
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from repq.errors import RepqError
from repq.io import atomic_write
from repq.quant.modules import (CODEBOOK_LAYERS, QUANT_LAYERS, QuantConv2d, QuantGlobalAvgPool, coarse_conv_args,
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
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array, order="C"), name))   # 0-d stays 0-d
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.name(base + "_" + op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _quantize_input(g: _GraphBuilder, layer: nn.Module, x: str, base: str,
                    signed_as_uint8: bool = False) -> tuple[str, str, str]:
    """QuantizeLinear of a layer's input: (codes, scale, zero point); `signed_as_uint8` stores signed codes c as
    uint8 c + 128. Codes narrower than 8 bits travel in the 8-bit container: an integer Clip after the
    QuantizeLinear narrows them to their own range (QuantizeLinear only saturates to the container's). Clipping the
    codes rather than the float input keeps the Q right after the producing conv, so ONNX Runtime still fuses that
    conv into a QLinearConv (a float Clip in between would leave it a ConvInteger)."""
    q = layer.input_quantizer
    if q.bits > 8:
        raise RepqError(f"ONNX export supports activations up to 8 bits; '{base}' has {q.bits}")
    scale_value = float(q.scale)
    scale = g.const(base + "_x_scale", np.array(scale_value, dtype=np.float32))
    if q.signed and not signed_as_uint8:
        zero = g.const(base + "_x_zero", np.array(0, dtype=np.int8))
    else:   # unsigned codes carry their zero point (0, or an affine grid's)
        zero = g.const(base + "_x_zero", np.array(128 if q.signed else int(q.zero_point), dtype=np.uint8))
    codes = g.node("QuantizeLinear", [x, scale, zero], base)
    if q.bits < 8:
        offset = 128 if q.signed and signed_as_uint8 else 0
        dtype = np.int8 if q.signed and not signed_as_uint8 else np.uint8
        lo, hi = (g.const(base + n, np.array(int(v) + offset, dtype=dtype)) for n, v in (("_qmin", q.qmin),
                                                                                 ("_qmax", q.qmax)))
        codes = g.node("Clip", [codes, lo, hi], base)
    return codes, scale, zero


def _weight_codes(g: _GraphBuilder, codes: torch.Tensor, base: str) -> str:
    if codes.abs().max() > 127:
        raise RepqError(f"'{base}' has weight codes beyond int8; ONNX export supports w_bits <= 8")
    return g.const(base + "_w", codes.cpu().numpy().astype(np.int8))


def _bias_codes(layer: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """The layer's int32 bias codes and their scale, exactly as the simulation uses them."""
    codes, step = layer.bias_codes()
    codes = codes.detach().cpu().double().numpy()   # float64: 2^31 - 1 is not a float32, and a cast must not wrap
    if np.abs(codes).max(initial=0) > np.iinfo(np.int32).max:
        raise RepqError(f"'{layer.input_quantizer.name}': bias codes beyond int32; requantize the model with this "
                        "repq version (it widens such channels' weight scales)")
    return codes.astype(np.int32), step.detach().cpu().numpy().astype(np.float32)


def _dequantized_operands(g: _GraphBuilder, layer: nn.Module, xq: str, codes: torch.Tensor, scale: torch.Tensor,
                          name: str, with_bias: bool) -> list[str]:
    """[input, DQ(int8 weight codes, per-channel scale), DQ(int32 bias codes)]: what a fusable conv/gemm takes."""
    w_scale = g.const(name + "_w_scale", scale.detach().cpu().numpy().astype(np.float32))
    w_zero = g.const(name + "_w_zero", np.zeros(scale.numel(), dtype=np.int8))
    inputs = [xq, g.node("DequantizeLinear", [_weight_codes(g, codes, name), w_scale, w_zero], name + "_w", axis=0)]
    if with_bias and layer.bias is not None:
        b_codes, step = _bias_codes(layer)
        b_args = [g.const(name + "_b", b_codes), g.const(name + "_b_scale", step),
                  g.const(name + "_b_zero", np.zeros(step.size, dtype=np.int32))]
        inputs.append(g.node("DequantizeLinear", b_args, name + "_b", axis=0))
    return inputs


def _emit_qdq_layer(g: _GraphBuilder, layer: nn.Module, x: str, base: str) -> str:
    """Q -> DQ -> Conv/Gemm(DQ(int8 W), DQ(int32 b)): ONNX Runtime fuses it into QLinearConv / QGemm."""
    codes, s, z = _quantize_input(g, layer, x, base, signed_as_uint8=isinstance(layer, nn.Conv2d))
    xq = g.node("DequantizeLinear", [codes, s, z], base)
    inputs = _dequantized_operands(g, layer, xq, layer.weight_codes, layer.weight_scale, base, with_bias=True)
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
        attrs = _coarse_attrs(layer)
        out = g.node("Add", [out, branch(layer.coarse_codes, layer.coarse_scale, attrs, base + "_coarse")], base)
    if layer.bias is not None:
        codes, step = _bias_codes(layer)
        bias = (codes.astype(np.float64) * step).astype(np.float32).reshape(1, -1, 1, 1)
        out = g.node("Add", [out, g.const(base + "_bias", bias)], base)
    return out


def _emit_two_branch(g: _GraphBuilder, layer: QuantConv2d, x: str, base: str) -> str:
    """CFWS as two fused integer convs: Q(x) -> DQ -> Conv(fine W, int32 bias) -> Q(int8 as uint8 + 128) -> DQ and
    DQ -> Conv(coarse W) -> Q -> DQ, then Add. ONNX Runtime fuses each conv into a QLinearConv and the add into a
    QLinearAdd when the next layer requantizes the sum (a ReLU in between vanishes into an unsigned grid).

    Layout "residual" (TensorRT-style, NVIDIA's Q/DQ placement for residual adds): the fine conv's output is not
    requantized; the coarse conv's int8 output enters the Add as the residual input, which TensorRT fuses into
    the fine conv's epilogue. ONNX Runtime runs it too (the fine conv then in float), for parity checks."""
    codes, s, z = _quantize_input(g, layer, x, base, signed_as_uint8=True)
    outs = []
    for part, w_codes, w_scale_t, attrs in (
            ("", layer.weight_codes, layer.weight_scale, _conv_attrs(layer)),
            ("_coarse", layer.coarse_codes, layer.coarse_scale, _coarse_attrs(layer))):
        name = base + part
        xq = g.node("DequantizeLinear", [codes, s, z], name)
        inputs = _dequantized_operands(g, layer, xq, w_codes, w_scale_t, name, with_bias=not part)   # bias: fine
        acc = g.node("Conv", inputs, name, **attrs)
        if not part and layer.branch_layout == "residual":
            outs.append(acc)
            continue
        out_scale = g.const(name + "_y_scale", np.array(float(layer.branch_scales[0 if not part else 1]),
                                                         dtype=np.float32))
        out_zero = g.const(name + "_y_zero", np.array(128, dtype=np.uint8))   # int8 codes c travel as c + 128
        yq = g.node("QuantizeLinear", [acc, out_scale, out_zero], name)
        outs.append(g.node("DequantizeLinear", [yq, out_scale, out_zero], name))
    return g.node("Add", outs, base)


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
    scale, zero = float(q.scale), float(q.zero_point)
    s = g.const(base + "_x_scale", np.array(scale, dtype=np.float32))
    clipped = _emit_clip(g, x, base, (float(q.qmin) - zero) * scale, (float(q.qmax) - zero) * scale)
    codes = g.node("Round", [g.node("Div", [clipped, s], base)], base)
    xq = g.node("Mul", [codes, s], base)
    indices = g.const(base + "_w_indices", layer.weight_indices.cpu().numpy().astype(np.uint8))
    codebook = g.const(base + "_codebook", layer.codebook.detach().cpu().numpy().astype(np.float32))
    w = g.node("Gather", [codebook, g.node("Cast", [indices], base + "_w", to=6)], base + "_w", axis=0)
    if layer.per_channel:   # per-output-channel codebook scale
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        channel_scale = layer.channel_scale.detach().cpu().numpy().astype(np.float32).reshape(shape)
        w = g.node("Mul", [w, g.const(base + "_w_channel_scale", channel_scale)], base + "_w")
    return _conv_or_gemm(g, layer, [xq, w] + _float_bias(g, layer, base), base)


def _conv_attrs(conv: nn.Conv2d) -> dict[str, Any]:
    return dict(kernel_shape=list(conv.kernel_size), strides=list(conv.stride),
                pads=[conv.padding[0], conv.padding[1]] * 2, group=conv.groups, dilations=list(conv.dilation))


def _coarse_attrs(layer: QuantConv2d) -> dict[str, Any]:
    """Attributes of the conv that applies a CFWS layer's coarse codes (modules.coarse_conv_args)."""
    a = coarse_conv_args(layer)
    return dict(kernel_shape=list(layer.coarse_codes.shape[-2:]), strides=list(a["stride"]),
                pads=[a["padding"][0], a["padding"][1]] * 2, group=a["groups"], dilations=list(a["dilation"]))


def _emit_quant_layer(g: _GraphBuilder, layer: nn.Module, x: str, base: str, fusable: bool) -> str:
    """QDQ form where ONNX Runtime fuses it (8-bit input, output requantized by the next layer), else the
    explicit integer form; both compute the simulation's integer arithmetic."""
    if layer.w_bits > 8:
        raise RepqError(f"'{base}' has {layer.w_bits}-bit weights; ONNX export supports w_bits <= 8")
    if isinstance(layer, CODEBOOK_LAYERS):
        return _emit_codebook_layer(g, layer, x, base)
    if isinstance(layer, QuantConv2d) and layer.two_branch:
        if layer.coarse == "center" and (layer.padding[0] != layer.kernel_size[0] // 2 or layer.dilation[0] != 1):
            raise RepqError(f"CFWS export of '{base}' needs 'same' padding and no dilation")
        return _emit_two_branch(g, layer, x, base)
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


def _pair(v: Any) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _pool_attrs(kernel: Any, stride: Any, padding: Any, ceil_mode: bool) -> dict[str, Any]:
    k, p = _pair(kernel), _pair(padding)
    return dict(kernel_shape=list(k), strides=list(_pair(stride if stride else kernel)), pads=[p[0], p[1]] * 2,
                ceil_mode=int(bool(ceil_mode)))


def _emit_silu(g: _GraphBuilder, x: str, base: str) -> str:
    return g.node("Mul", [x, g.node("Sigmoid", [x], base)], base)


def _emit_gelu(g: _GraphBuilder, x: str, base: str) -> str:
    """x * 0.5 * (1 + erf(x / sqrt(2))) (opset 19 has no Gelu)."""
    root2 = g.const(base + "_sqrt2", np.array(np.sqrt(2.0), dtype=np.float32))
    one, half = (g.const(base + n, np.array(v, dtype=np.float32)) for n, v in (("_one", 1.0), ("_half", 0.5)))
    erf = g.node("Erf", [g.node("Div", [x, root2], base)], base)
    return g.node("Mul", [g.node("Mul", [x, half], base), g.node("Add", [erf, one], base)], base)


def _emit_clip(g: _GraphBuilder, x: str, base: str, low: float, high: float) -> str:
    lo, hi = (g.const(base + n, np.array(v, dtype=np.float32)) for n, v in (("_lo", low), ("_hi", high)))
    return g.node("Clip", [x, lo, hi], base)


def _emit_resize(g: _GraphBuilder, x: str, base: str, scale: Any, mode: str) -> str:
    """Nearest-neighbour upsampling by an integer factor (PyTorch's 'nearest' = ONNX asymmetric + floor)."""
    factors = _pair(scale) if scale is not None else None
    if mode != "nearest" or factors is None or any(float(f) != int(f) for f in factors):
        raise RepqError(f"ONNX export supports nearest upsampling by an integer scale factor; '{base}' uses "
                        f"mode={mode}, scale_factor={scale}")
    scales = g.const(base + "_scales", np.array([1, 1, *factors], dtype=np.float32))
    return g.node("Resize", [x, "", scales], base, mode="nearest", coordinate_transformation_mode="asymmetric",
                  nearest_mode="floor")


def _emit_module(g: _GraphBuilder, module: nn.Module, x: str, base: str, fusable: bool = False) -> str:
    if isinstance(module, QUANT_LAYERS):
        return _emit_quant_layer(g, module, x, base, fusable)
    if isinstance(module, QuantGlobalAvgPool):
        codes, s, z = _quantize_input(g, module, x, base)
        return g.node("GlobalAveragePool", [g.node("DequantizeLinear", [codes, s, z], base)], base)
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return _emit_float_layer(g, module, x, base)
    if isinstance(module, nn.ConvTranspose2d) and module.padding_mode == "zeros":   # kept in float (skip_layers)
        w = g.const(base + "_w", module.weight.detach().cpu().numpy().astype(np.float32))
        p = _pair(module.padding)
        return g.node("ConvTranspose", [x, w] + _float_bias(g, module, base), base,
                      kernel_shape=list(module.kernel_size), strides=list(module.stride), pads=[p[0], p[1]] * 2,
                      output_padding=list(module.output_padding), group=module.groups,
                      dilations=list(module.dilation))
    if isinstance(module, nn.ReLU):
        return g.node("Relu", [x], base)
    if isinstance(module, nn.ReLU6):
        return _emit_clip(g, x, base, 0.0, 6.0)
    if isinstance(module, nn.SiLU):
        return _emit_silu(g, x, base)
    if isinstance(module, nn.Sigmoid):
        return g.node("Sigmoid", [x], base)
    if isinstance(module, nn.Tanh):
        return g.node("Tanh", [x], base)
    if isinstance(module, nn.Hardswish):
        return g.node("HardSwish", [x], base)
    if isinstance(module, nn.Hardsigmoid):
        return g.node("HardSigmoid", [x], base, alpha=1 / 6, beta=0.5)
    if isinstance(module, nn.LeakyReLU):
        return g.node("LeakyRelu", [x], base, alpha=float(module.negative_slope))
    if isinstance(module, nn.GELU) and module.approximate == "none":
        return _emit_gelu(g, x, base)
    if is_global_avg_pool(module):
        return g.node("GlobalAveragePool", [x], base)
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return g.node("Flatten", [x], base, axis=1)
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return x
    if isinstance(module, nn.MaxPool2d) and _pair(module.dilation) == (1, 1) and not module.return_indices:
        return g.node("MaxPool", [x], base, **_pool_attrs(module.kernel_size, module.stride, module.padding,
                                                          module.ceil_mode))
    if isinstance(module, nn.AvgPool2d) and module.divisor_override is None:
        return g.node("AveragePool", [x], base, count_include_pad=int(module.count_include_pad),
                      **_pool_attrs(module.kernel_size, module.stride, module.padding, module.ceil_mode))
    if isinstance(module, nn.Upsample):
        return _emit_resize(g, x, base, module.scale_factor, module.mode)
    raise RepqError(f"ONNX export does not support layer {type(module).__name__} at '{base}'")


def _requantized_outputs(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> set[str]:
    """Nodes whose output reaches only 8-bit quantized inputs, directly or through one ReLU into unsigned ones
    (ORT's QDQ fusion pattern: it folds a ReLU into the Q after it only when the zero point is the range's bottom)."""
    def quantized_input(n: torch.fx.Node, after_relu: bool) -> bool:
        module = modules[n.target] if n.op == "call_module" else None
        if not isinstance(module, _QUANT_INPUTS):
            return False
        q = module.input_quantizer  # narrower codes are clipped after the Q, which keeps the pattern
        return q.bits <= 8 and not (after_relu and (q.signed or q.affine))

    def users_of(n: torch.fx.Node) -> list[torch.fx.Node]:
        """Users, looking through nn.Identity / nn.Dropout (they emit no ONNX node)."""
        out = []
        for u in n.users:
            passes = u.op == "call_module" and isinstance(modules[u.target], (nn.Identity, nn.Dropout))
            out += users_of(u) if passes else [u]
        return out

    found = set()
    for node in graph.nodes:
        users, after_relu = users_of(node), False
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], nn.ReLU):
            users, after_relu = users_of(users[0]), True
        if users and all(quantized_input(u, after_relu) for u in users):
            found.add(node.name)
    return found


_BINARY = {operator.add: "Add", torch.add: "Add", operator.sub: "Sub", torch.sub: "Sub", operator.mul: "Mul",
           torch.mul: "Mul", operator.truediv: "Div", torch.div: "Div"}
_BINARY_METHODS = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}
_UNARY = {torch.relu: "Relu", F.relu: "Relu", torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", torch.tanh: "Tanh",
          F.hardswish: "HardSwish"}
_UNARY_METHODS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}


class _Values:
    """ONNX names of the traced graph's values: tensors, 1-D int64 shape pieces (from size()/shape), lists of
    tensors (chunk), and the Python constants fx leaves in the arguments."""

    def __init__(self, g: _GraphBuilder):
        self.g, self.names, self.shape_like = g, {}, set()

    def __getitem__(self, node: torch.fx.Node) -> Any:
        return self.names[node.name]

    def set(self, node: torch.fx.Node, value: Any, shape_like: bool = False) -> None:
        self.names[node.name] = value
        if shape_like:
            self.shape_like.add(node.name)

    def tensor(self, arg: Any, base: str) -> str:
        if isinstance(arg, torch.fx.Node):
            return self.names[arg.name]
        if isinstance(arg, (bool, int, float)):
            return self.g.const(base + "_c", np.array(float(arg), dtype=np.float32))
        raise RepqError(f"ONNX export does not support the argument {arg!r} in '{base}'")

    def shape(self, pieces: Any, base: str) -> str:
        """An int64 shape tensor from ints and size() values (view / reshape arguments)."""
        parts = []
        for p in pieces:
            if isinstance(p, torch.fx.Node) and p.name in self.shape_like:
                parts.append(self.names[p.name])
            elif isinstance(p, int):
                parts.append(self.g.const(base + "_dim", np.array([p], dtype=np.int64)))
            else:
                raise RepqError(f"ONNX export supports view/reshape with ints and size() values; '{base}' has {p!r}")
        return parts[0] if len(parts) == 1 else self.g.node("Concat", parts, base, axis=0)


def _dims(arg: Any) -> list[int]:
    return list(arg) if isinstance(arg, (tuple, list)) else [arg]


def _kwarg(node: torch.fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _emit_function(g: _GraphBuilder, node: torch.fx.Node, v: _Values) -> None:
    """call_function and call_method nodes: arithmetic, activations, cat, shapes, pooling, means."""
    fn, base = node.target, node.name
    method = fn if node.op == "call_method" else None
    x = node.args[0] if node.args else None
    if fn in _BINARY or method in _BINARY_METHODS:
        op = _BINARY.get(fn) or _BINARY_METHODS[method]
        v.set(node, g.node(op, [v.tensor(node.args[0], base), v.tensor(node.args[1], base)], base))
    elif fn in _UNARY or method in _UNARY_METHODS:
        v.set(node, g.node(_UNARY.get(fn) or _UNARY_METHODS[method], [v[x]], base))
    elif fn is F.silu:
        v.set(node, _emit_silu(g, v[x], base))
    elif fn is F.relu6:
        v.set(node, _emit_clip(g, v[x], base, 0.0, 6.0))
    elif fn is F.gelu and node.kwargs.get("approximate", "none") == "none":
        v.set(node, _emit_gelu(g, v[x], base))
    elif fn in (torch.cat, torch.concat):
        axis = _kwarg(node, 1, "dim", 0)
        v.set(node, g.node("Concat", [v[t] for t in node.args[0]], base, axis=axis))
    elif fn is torch.flatten or method == "flatten":
        start, end = _kwarg(node, 1, "start_dim", 0), _kwarg(node, 2, "end_dim", -1)
        if start == 0 or end != -1:
            raise RepqError(f"ONNX export does not support flatten with start_dim={start}, end_dim={end} at "
                            f"'{base}' (supported: flatten(x, 1) and any start_dim >= 1 to the last dim)")
        v.set(node, g.node("Flatten", [v[x]], base, axis=start))
    elif method in ("view", "reshape") or fn is torch.reshape:
        pieces = node.args[1:] if method else node.args[1]
        if len(pieces) == 1 and isinstance(pieces[0], (tuple, list)):
            pieces = pieces[0]
        v.set(node, g.node("Reshape", [v[x], v.shape(pieces, base)], base))
    elif method == "size" or (fn is getattr and node.args[1] == "shape"):
        shape = g.node("Shape", [v[x]], base)
        dim = _kwarg(node, 1, "dim", None) if method else None
        if dim is None:
            v.set(node, shape, shape_like=True)
        else:
            v.set(node, _slice(g, shape, dim, base), shape_like=True)
    elif fn is operator.getitem and x.name in v.shape_like and isinstance(node.args[1], int):
        v.set(node, _slice(g, v[x], node.args[1], base), shape_like=True)
    elif fn is operator.getitem and isinstance(v[x], list) and isinstance(node.args[1], int):
        v.set(node, v[x][node.args[1]])
    elif method == "chunk" or fn is torch.chunk:
        chunks, dim = _kwarg(node, 1, "chunks", None), _kwarg(node, 2, "dim", 0)
        outs = [g.name(base + f"_chunk{i}") for i in range(chunks)]
        g.nodes.append(g.helper.make_node("Split", [v[x]], outs, name=g.name(base + "_split"), axis=dim,
                                          num_outputs=chunks))
        v.set(node, outs)
    elif method == "mean" or fn is torch.mean:
        dims = _dims(_kwarg(node, 1, "dim", None))
        keep = int(bool(_kwarg(node, 2, "keepdim", False)))
        axes = g.const(base + "_axes", np.array(dims, dtype=np.int64))
        v.set(node, g.node("ReduceMean", [v[x], axes], base, keepdims=keep))
    elif fn is F.interpolate:
        scale = node.kwargs.get("scale_factor", node.args[2] if len(node.args) > 2 else None)
        if node.kwargs.get("size") is not None or (len(node.args) > 1 and node.args[1] is not None):
            raise RepqError(f"ONNX export supports interpolate with scale_factor, not size, at '{base}'")
        v.set(node, _emit_resize(g, v[x], base, scale, node.kwargs.get("mode", "nearest")))
    elif fn is F.max_pool2d:
        v.set(node, g.node("MaxPool", [v[x]], base, **_pool_attrs(
            _kwarg(node, 1, "kernel_size", None), _kwarg(node, 2, "stride", None), _kwarg(node, 3, "padding", 0),
            node.kwargs.get("ceil_mode", False))))
    elif fn is F.avg_pool2d:
        kernel = _kwarg(node, 1, "kernel_size", None)
        if isinstance(kernel, torch.fx.Node):   # the original SE: avg_pool2d(x, kernel_size=x.size(3))
            size = node.meta.get("tensor_meta")
            if size is None or tuple(size.shape[2:]) != (1, 1):
                raise RepqError(f"ONNX export supports avg_pool2d with a computed kernel only when it pools the "
                                f"whole map; '{base}' does not")
            v.set(node, g.node("GlobalAveragePool", [v[x]], base))
        else:
            v.set(node, g.node("AveragePool", [v[x]], base, count_include_pad=int(node.kwargs.get(
                "count_include_pad", True)), **_pool_attrs(kernel, _kwarg(node, 2, "stride", None),
                                                           _kwarg(node, 3, "padding", 0),
                                                           node.kwargs.get("ceil_mode", False))))
    elif fn is F.adaptive_avg_pool2d and _pair(_kwarg(node, 1, "output_size", None)) == (1, 1):
        v.set(node, g.node("GlobalAveragePool", [v[x]], base))
    elif method in ("contiguous", "float") or fn is torch.Tensor.contiguous:
        v.set(node, v[x])
    else:
        where = _module_of(node)
        raise RepqError(f"ONNX export does not support '{node.op} {getattr(fn, '__name__', fn)}'"
                        + (f" in '{where}'" if where else "") + "; keep such code out of the exported model")


def _slice(g: _GraphBuilder, shape: str, index: int, base: str) -> str:
    start = g.const(base + "_start", np.array([index], dtype=np.int64))
    end = g.const(base + "_end", np.array([index + 1 if index != -1 else np.iinfo(np.int64).max], dtype=np.int64))
    return g.node("Slice", [shape, start, end], base)


def _module_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _output_names(out: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(ONNX output name, fx value) for each tensor of the model output: 'logits' for a single tensor; indices
    or dict keys for tuples, lists and dicts; None skipped."""
    if isinstance(out, torch.fx.Node):
        return [(prefix or "logits", out)]
    if isinstance(out, dict):
        items = [(str(k), o) for k, o in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(str(i), o) for i, o in enumerate(out)]
    elif out is None:
        return []
    else:
        raise RepqError(f"ONNX export supports tensor, tuple, list and dict outputs, not {type(out).__name__}")
    return [pair for key, o in items for pair in _output_names(o, f"{prefix}_{key}" if prefix else f"output_{key}")]


def _leaf_tracer() -> torch.fx.Tracer:
    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, _QUANT_INPUTS) or super().is_leaf_module(m, qualname)
    return Tracer()


def build_onnx(model: nn.Module, example_input: torch.Tensor):
    """The ONNX ModelProto of `model` (quantized: QDQ; float: plain), batch dimension dynamic."""
    from onnx import TensorProto, helper

    from repq.reparam.verify import tensors_of

    try:
        graph = _leaf_tracer().trace(model)
    except Exception as exc:  # fx raises many types for dynamic control flow
        raise RepqError(f"cannot trace the model for export ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); repq exports static graphs")
    modules = dict(model.named_modules())
    requantized = _requantized_outputs(graph, modules)
    try:   # static shapes of every value on the example (for pools whose kernel is computed from a size)
        from torch.fx.passes.shape_prop import ShapeProp
        with torch.no_grad():
            ShapeProp(torch.fx.GraphModule(model, graph)).propagate(example_input[:1])
    except Exception:  # noqa: BLE001 - shapes are an aid; the emitters that need them refuse without
        pass
    g = _GraphBuilder()
    values = _Values(g)
    outputs: list[tuple[str, Any]] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            if values.names:
                raise RepqError("ONNX export supports models with one input tensor")
            values.set(node, "input")
        elif node.op == "call_module":
            values.set(node, _emit_module(g, modules[node.target], values[node.args[0]], node.target,
                                          fusable=node.name in requantized))
        elif node.op == "get_attr":
            attr = _get_attr(model, node.target)
            values.set(node, g.const(node.target, attr.detach().cpu().numpy().astype(np.float32)))
        elif node.op in ("call_function", "call_method"):
            _emit_function(g, node, values)
        elif node.op == "output":
            outputs = _output_names(node.args[0])
    with torch.no_grad():
        shapes = [t.shape for t in tensors_of(model(example_input[:1]))]
    if len(shapes) != len(outputs):
        raise RepqError("ONNX export: the model's outputs could not be matched to its traced graph")
    infos = []
    for (name, node), shape in zip(outputs, shapes):
        g.nodes.append(helper.make_node("Identity", [values[node]], [name], name=name + "_identity"))
        infos.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *shape[1:]]))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *example_input.shape[1:]])]
    onnx_graph = helper.make_graph(g.nodes, "repq", inputs, infos, g.initializers)
    proto = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="repq")
    proto.ir_version = 9
    return proto


def _get_attr(model: nn.Module, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    value = getattr(model.get_submodule(owner) if owner else model, name)
    if not isinstance(value, torch.Tensor):
        raise RepqError(f"ONNX export supports tensor attributes only; '{target}' is {type(value).__name__}")
    return value


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor,
                allow_float: bool = False, metadata: dict[str, Any] | None = None) -> Path:
    """Write `model` as ONNX (checked with onnx.checker, written atomically). A model from `repq.quantize` becomes
    a QDQ graph; a float model needs `allow_float=True` (the FP reference). `metadata` (e.g. the data a checkpoint
    was made with: name, input size, normalization, classes) is stored as the model's metadata_props, JSON
    values under their keys, so a runtime can read how to feed the model."""
    try:
        import onnx
    except ImportError:
        raise RepqError("ONNX export needs the onnx package: pip install 'repq[export]'") from None
    quantized = any(isinstance(m, QUANT_LAYERS) for m in model.modules())
    if not quantized and not allow_float:
        raise RepqError("the model is not quantized; run repq.quantize first, or export the float model with --fp")
    model = model.eval()
    proto = build_onnx(model, example_input)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), json.dumps(value)
    onnx.checker.check_model(proto, full_check=True)
    tables = codebook_tables(model)
    if tables:
        atomic_write(codebook_path(path), lambda fh: np.savez(fh, **tables))
    return atomic_write(path, lambda fh: fh.write(proto.SerializeToString()))


LUT_NOTE = ("ClusterQAT layers: weight[i] = codebook[indices[i]] (indices uint8, shape of the weight; codebook "
            "float32, 2^b entries), times channel_scale[output channel of i] where a layer has a channel_scale "
            "(float32, one per output channel). A lookup-table runtime multiplies the quantized input codes, minus "
            "input_zero_point, by codebook entries picked by the b-bit indices (or precomputes codebook x "
            "input-level products per layer), accumulates, then scales by the input scale (and the channel scale) "
            "and adds the float bias. "
            "Runtimes without LUT kernels use the dequantized weights (what the ONNX graph computes).")


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
            if layer.per_channel:
                tables[f"{name}.channel_scale"] = layer.channel_scale.detach().cpu().numpy().astype(np.float32)
            tables[f"{name}.input_scale"] = np.array(float(layer.input_quantizer.scale), dtype=np.float32)
            tables[f"{name}.input_zero_point"] = np.array(int(layer.input_quantizer.zero_point), dtype=np.int32)
            tables[f"{name}.bits"] = np.array([layer.w_bits, layer.input_quantizer.bits], dtype=np.int32)
    if tables:
        tables["note"] = np.array(LUT_NOTE)
    return tables

"""Quantized layers that simulate integer execution exactly: int codes x scales for weights, a per-tensor
activation quantizer on the input, and an int32-grid bias (scale = input scale x weight scale).

Every number needed for export lives in buffers, so a checkpoint's state dict restores the layer bit-exactly.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repq.errors import RepqError
from repq.quant.calibrators import CalibrationConfig, HistogramObserver, compute_amax
from repq.quant.primitives import along_axis, asymmetric_params, fake_quantize, int_range, symmetric_scale
from repq.quant.weights import COARSE_LAYOUTS, QuantizedWeight, quantize_weight

_INT32_MIN, _INT32_MAX = -(2 ** 31), 2 ** 31 - 1


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer: symmetric (zero point 0) on a signed or unsigned grid, or affine (unsigned
    codes with a zero point, `set_affine`: LSQ+ QAT of inputs with a small negative tail such as SiLU outputs).
    Modes: "quant", "observe" (calibrate and pass the float input on: one FP pass), "calibrate" (calibrate, then
    quantize: sequential PTQ), "off"."""

    def __init__(self, bits: int = 8):
        super().__init__()
        self.bits = bits
        qmin, qmax = int_range(bits, signed=True)
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))
        self.register_buffer("qmin", torch.tensor(float(qmin)))
        self.register_buffer("qmax", torch.tensor(float(qmax)))
        self.mode = "quant"
        self.calibration: CalibrationConfig | None = None
        self.allow_unsigned = False
        self.name = ""

    @property
    def signed(self) -> bool:
        return bool(self.qmin < 0)

    @property
    def affine(self) -> bool:
        return bool(self.zero_point != 0)

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        cfg = self.calibration
        if cfg is None:
            raise RuntimeError("ActQuantizer.calibration must be set before calibrating")
        if not torch.isfinite(x).all():
            raise RepqError(f"NaN/Inf activations at the input of '{self.name}' during calibration; "
                            "check the model weights and the calibration images")
        if cfg.method == "affine":
            self.set_min_max(float(x.min()), float(x.max()))
            return
        signed = not (self.allow_unsigned and bool(x.min() >= 0))
        self.set_range(compute_amax(x, replace(cfg, bits=self.bits, signed=signed)), signed)

    @torch.no_grad()
    def set_range(self, amax: float, signed: bool) -> None:
        """Clip at `amax` on a signed or unsigned grid (scale amax / qmax; scale 1 for an all-zero input)."""
        qmin, qmax = int_range(self.bits, signed=signed)
        self.qmin.fill_(qmin)
        self.qmax.fill_(qmax)
        self.zero_point.zero_()
        self.scale.copy_(symmetric_scale(torch.tensor(float(amax)), qmax))

    @torch.no_grad()
    def set_min_max(self, low: float, high: float) -> None:
        """Unsigned codes spanning [min(low, 0), max(high, 0)] with an integer zero point (zero point 0, the plain
        unsigned grid, when nothing is negative). Why, for the network input: a normalized 8-bit image takes 256
        values per channel between its min and max, and this grid holds each of them (exactly for one channel),
        where a symmetric signed grid gives [0, max] only 2^(b-1) - 1 codes."""
        if low >= 0.0:
            self.set_range(high, signed=False)
            return
        scale, zero_point = asymmetric_params(torch.tensor(low), torch.tensor(high), self.bits)
        self.set_affine(float(scale), int(zero_point))

    @torch.no_grad()
    def set_affine(self, scale: float, zero_point: int) -> None:
        """Unsigned codes c in [0, 2^b - 1] standing for (c - zero_point) x scale."""
        qmin, qmax = int_range(self.bits, signed=False)
        if not qmin <= zero_point <= qmax:
            raise RepqError(f"'{self.name}': zero point {zero_point} outside the {self.bits}-bit unsigned range")
        self.qmin.fill_(qmin)
        self.qmax.fill_(qmax)
        self.zero_point.fill_(float(zero_point))
        self.scale.fill_(float(scale))

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "off":
            return x
        if self.mode in ("calibrate", "observe"):
            self.calibrate(x)
            if self.mode == "observe":
                return x
        return fake_quantize(x, self.scale, self.zero_point, int(self.qmin), int(self.qmax))

    def extra_repr(self) -> str:
        zero = f", zero_point={int(self.zero_point)}" if self.affine else ""
        return f"bits={self.bits}, signed={self.signed}, scale={float(self.scale):.6g}{zero}"


class QuantWeightMixin:
    """Weight codes and scales (plus the CFWS coarse part) as buffers; `coarse` is None, "center", "diagonal" or
    "whole" (QuantizedWeight.coarse_layout)."""

    weight: Tensor
    bias: Tensor | None

    def _adopt(self, float_layer: nn.Module, w_bits: int, a_bits: int, coarse: str | None) -> None:
        """Take the float layer's weight and bias, then add the quantization buffers."""
        with torch.no_grad():
            self.weight.copy_(float_layer.weight)
            if float_layer.bias is not None:
                self.bias.copy_(float_layer.bias)
        self._init_quant(w_bits, a_bits, coarse)

    def _init_quant(self, w_bits: int, a_bits: int, coarse: str | None) -> None:
        self.w_bits, self.coarse = w_bits, coarse
        out_ch = self.weight.shape[0]
        self.register_buffer("weight_codes", torch.zeros_like(self.weight, dtype=torch.int32))
        self.register_buffer("weight_scale", torch.ones(out_ch))
        if coarse is not None:
            if coarse not in COARSE_LAYOUTS:
                raise RepqError(f"unknown CFWS coarse layout {coarse!r} (a damaged checkpoint?); expected one of "
                                f"{', '.join(COARSE_LAYOUTS)}")
            shape = {"whole": self.weight.shape, "center": (*self.weight.shape[:2], 1, 1),
                     "diagonal": (out_ch, 1, 1, 1)}[coarse]
            self.register_buffer("coarse_codes", torch.zeros(shape, dtype=torch.int32))
            self.register_buffer("coarse_scale", torch.ones(out_ch))
        self.input_quantizer = ActQuantizer(a_bits)
        self.use_float_weight = False

    @torch.no_grad()
    def set_quantized_weight(self, qw: QuantizedWeight) -> None:
        if qw.coarse_layout != self.coarse:
            raise ValueError(f"quantized weight (coarse layout {qw.coarse_layout}) does not match the layer's "
                             f"({self.coarse})")
        self.weight_codes.copy_(qw.codes.to(torch.int32))
        self.weight_scale.copy_(qw.scale)
        if qw.coarse_codes is not None:
            self.coarse_codes.copy_(qw.coarse_codes.to(torch.int32))
            self.coarse_scale.copy_(qw.coarse_scale)

    def quantized_weight(self) -> QuantizedWeight:
        coarse = (self.coarse_codes.float(), self.coarse_scale) if self.coarse else (None, None)
        return QuantizedWeight(self.weight_codes.float(), self.weight_scale, *coarse, layout=self.coarse)

    def effective_weight(self) -> Tensor:
        """The weight the integer kernel multiplies by: coarse (padded center, expanded diagonal or whole) + fine,
        dequantized. Kept until one of the buffers it comes from changes: calibration runs the network dozens of
        times with the same weights, and dequantizing them in every forward was a visible share of PTQ time."""
        if self.use_float_weight:
            return self.weight
        key = self._weight_key()
        if key is not None and key == self.__dict__.get("_weight_cache_key"):
            return self.__dict__["_weight_cache"]
        weight = self.quantized_weight().dequantize()
        if key is not None:
            self.__dict__["_weight_cache_key"], self.__dict__["_weight_cache"] = key, weight
        return weight

    def _weight_key(self) -> tuple | None:
        """Identity, storage, type and in-place version of every buffer the dequantized weight comes from: any
        change to them (set_quantized_weight, load_state_dict, .to(), an in-place edit) misses the cache. None
        (no caching) for inference-mode tensors, which keep no version counter."""
        tensors = [self.weight_codes, self.weight_scale] + ([self.coarse_codes, self.coarse_scale] if self.coarse
                                                            else [])
        try:
            return tuple((id(t), t.data_ptr(), t.dtype, t.device, t._version) for t in tensors)
        except RuntimeError:
            return None

    def bias_codes(self) -> tuple[Tensor, Tensor]:
        """Bias codes on the integer grid of the (fine) accumulator and their scale (input x weight scale): int32
        up to 8-bit operands (what ONNX QLinearConv takes), unclamped for wider ones (int64 accumulators)."""
        step = self.input_quantizer.scale * self.weight_scale
        codes = torch.round(self.bias / step)
        if max(self.w_bits, self.input_quantizer.bits) <= 8:
            codes = torch.clamp(codes, _INT32_MIN, _INT32_MAX)
        return codes, step

    def effective_bias(self) -> Tensor | None:
        if self.bias is None or self.use_float_weight:
            return self.bias
        codes, step = self.bias_codes()
        return codes * step

    @torch.no_grad()
    def fit_bias_to_int32(self, headroom: float = 0.5) -> int:
        """Widen the (fine) weight scale of the channels whose bias would not fit the int32 grid, and requantize
        their weight codes; returns how many channels changed. The bias step is input scale x weight scale, so a
        channel whose weights are all near zero (a dead or barely trained filter) gets a step so small that its
        bias codes pass 2^31 and would saturate, or wrap in an int32 cast. ONNX Runtime's quantizer makes the
        same adjustment; `headroom` keeps the codes below half the int32 range for the accumulator's sake.
        A channel whose weight codes are all zero has a free scale: it gets exactly that smallest one, so its
        bias (all the channel outputs) is kept to about 1e-9 instead of to half an input-scale step."""
        if self.bias is None or self.use_float_weight or max(self.w_bits, self.input_quantizer.bits) > 8:
            return 0
        needed = self.bias.detach().abs() / (self.input_quantizer.scale * headroom * _INT32_MAX)
        dead = (self.weight_codes.flatten(1) == 0).all(1)
        if self.coarse is not None:
            dead &= (self.coarse_codes.flatten(1) == 0).all(1)
        widen = (needed > self.weight_scale) | (dead & (needed > 0) & (needed != self.weight_scale))
        if not widen.any():
            return 0
        shape = [-1] + [1] * (self.weight.dim() - 1)
        fine = self.weight_codes.float() * self.weight_scale.reshape(shape)
        limit = int(self.weight_codes.abs().max().clamp(min=2 ** (self.w_bits - 1) - 1))
        self.weight_scale.copy_(torch.where(widen, needed, self.weight_scale))
        codes = torch.clamp(torch.round(fine / self.weight_scale.reshape(shape)), -limit, limit).to(torch.int32)
        self.weight_codes.copy_(torch.where(widen.reshape(shape), codes, self.weight_codes))
        return int(widen.sum())


def coarse_conv_args(layer: nn.Conv2d) -> dict[str, Any]:
    """stride / padding / dilation / groups of the conv that applies a CFWS layer's coarse codes on its input:
    "center" is a 1x1 conv with the layer's groups and no padding (the layer has 'same' padding), "diagonal" a
    depthwise 1x1 conv (one code per channel on its own input channel), "whole" the layer's own conv."""
    if layer.coarse == "center":
        return dict(stride=layer.stride, padding=(0, 0), dilation=(1, 1), groups=layer.groups)
    if layer.coarse == "diagonal":
        return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.out_channels)
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


def conv_like(cls: type[nn.Conv2d], conv: nn.Conv2d) -> nn.Conv2d:
    """An uninitialized `cls` with `conv`'s geometry (quantized and QAT twins); numeric zero padding only."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise RepqError("repq quantizes Conv2d with numeric zero padding only")
    return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
               conv.groups, bias=conv.bias is not None)


def linear_like(cls: type[nn.Linear], linear: nn.Linear) -> nn.Linear:
    return cls(linear.in_features, linear.out_features, bias=linear.bias is not None)


class SimulatedConv2d(nn.Conv2d):
    """Conv whose forward is quantized input x `effective_weight()` + `effective_bias()` (set by a mixin)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.input_quantizer(x), self.effective_weight(), self.effective_bias(), self.stride,
                        self.padding, self.dilation, self.groups)


class SimulatedLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.effective_weight(), self.effective_bias())


class QuantConv2d(SimulatedConv2d, QuantWeightMixin):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int, coarse: str | None) -> "QuantConv2d":
        layer = conv_like(cls, conv)
        layer._adopt(conv, w_bits, a_bits, coarse)
        return layer.to(conv.weight.device)

    # ------------------------------------------------------------ CFWS as two fused integer convs
    @property
    def two_branch(self) -> bool:
        """CFWS deployed as two convs (either layout); `branch_layout` says which."""
        return hasattr(self, "branch_scales")

    def enable_two_branch(self, layout: str = "two_branch") -> None:
        """Deploy CFWS as two integer convs that runtimes fuse (PTQConfig.cfws_deploy="two_branch"): the fine conv
        (with the bias) and the coarse conv each requantize their int32 accumulator to int8 with their own output
        scale, and the layer output is the sum of the two (an integer add in the runtime). `branch_scales` holds
        the (fine, coarse) output scales; while they are 0 the layer is being calibrated (`calibrate_branches`):
        its branches pass through unrequantized.

        layout "residual" (TensorRT-style): only the coarse conv is requantized to int8; it enters the fine conv's
        output as a residual input, and the fine conv's accumulator is rescaled exactly (no int8 rounding)."""
        if self.coarse is None:
            raise RepqError("two-branch deployment applies to CFWS layers (a coarse part) only")
        if layout not in ("two_branch", "residual"):
            raise RepqError(f"unknown CFWS branch layout {layout!r} (a damaged checkpoint?); expected two_branch "
                            "or residual")
        self.branch_layout = layout
        self.register_buffer("branch_scales", torch.zeros(2, device=self.weight.device))
        self.branch_calibration: dict[str, Any] = {}

    def branch_accumulators(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The int32 accumulators of the fine conv (+ bias codes) and the coarse conv on the quantized input,
        computed exactly (float64 holds every sum of 8-bit products)."""
        xq = self.input_quantizer(x)
        codes = torch.round(xq / self.input_quantizer.scale).double()
        bias = self.bias_codes()[0].double() if self.bias is not None else None
        fine = F.conv2d(codes, self.weight_codes.double(), bias, self.stride, self.padding, self.dilation,
                        self.groups)
        a = coarse_conv_args(self)
        coarse = F.conv2d(codes, self.coarse_codes.double(), None, a["stride"], a["padding"], a["dilation"],
                          a["groups"])
        return fine, coarse

    def branch_multipliers(self) -> tuple[Tensor, Tensor]:
        """Per-channel requantization multipliers input scale x weight scale / output scale, in float32 in the
        order ONNX Runtime's QLinearConv computes them."""
        s_x = self.input_quantizer.scale.float()
        return ((s_x * self.weight_scale.float()) / self.branch_scales[0].float(),
                (s_x * self.coarse_scale.float()) / self.branch_scales[1].float())

    def forward(self, x: Tensor) -> Tensor:
        if not self.two_branch or self.use_float_weight:
            return super().forward(x)
        fine, coarse = self.branch_accumulators(x)
        shape = (1, -1, 1, 1)
        if not bool((self.branch_scales > 0).all()):   # calibrating: float branch outputs
            s_x = self.input_quantizer.scale.double()
            outs = ((fine * (s_x * self.weight_scale.double()).reshape(shape)).float(),
                    (coarse * (s_x * self.coarse_scale.double()).reshape(shape)).float())
            self._calibration_step(x, *outs)
            return outs[0] + outs[1]
        m_fine, m_coarse = self.branch_multipliers()
        q_coarse = torch.clamp(torch.round(coarse.float() * m_coarse.reshape(shape)), -128, 127)
        if self.branch_layout == "residual":   # the fine accumulator rescaled in float, plus the int8 residual
            s_x = self.input_quantizer.scale.double()
            return (fine * (s_x * self.weight_scale.double()).reshape(shape)).float() + q_coarse * self.branch_scales[1]
        q_fine = torch.clamp(torch.round(fine.float() * m_fine.reshape(shape)), -128, 127)
        return q_fine * self.branch_scales[0] + q_coarse * self.branch_scales[1]

    @torch.no_grad()
    def _calibration_step(self, x: Tensor, fine: Tensor, coarse: Tensor) -> None:
        """Pass 1 ("observe"): histograms of both branches. Pass 2 ("score"): against the float weights on the same
        quantized input, the squared error of what the next layer sees (the activation after the layer, which the
        output grid absorbs, applied to the layer output) for every pair of candidate branch thresholds, and for
        the plain one-conv alternative (the merged kernel on one min-max int8 grid). Scored on a seeded sample of
        at most BRANCH_SCORE_SAMPLES output elements per batch (all of them when fewer)."""
        state = self.branch_calibration
        if state.get("stage") == "exact":   # exact_branches: the exact sum, nothing recorded
            return
        if state.get("stage", "observe") == "observe":
            observers = state.setdefault("observers", [HistogramObserver(), HistogramObserver()])
            for observer, out in zip(observers, (fine, coarse)):
                observer.update(out, self.input_quantizer.name)
            return
        xq = self.input_quantizer(x)
        conv = (self.stride, self.padding, self.dilation, self.groups)
        reference = F.conv2d(xq, self.weight, self.bias, *conv).flatten()
        single = F.conv2d(xq, state["single_weight"], state["single_bias"], *conv).flatten()
        fine, coarse = fine.flatten(), coarse.flatten()
        if fine.numel() > BRANCH_SCORE_SAMPLES:
            pick = torch.randint(fine.numel(), (BRANCH_SCORE_SAMPLES,), generator=state["generator"])
            fine, coarse, reference, single = fine[pick], coarse[pick], reference[pick], single[pick]
        act = state["activation"]
        target = act(reference)
        state["single_error"] += float((act(single) - target).double().pow(2).sum())
        state["count"] += target.numel()
        q_fine = [torch.clamp(torch.round(fine / (a / 127.0)), -128, 127) * (a / 127.0) for a in state["fine"]] \
            if self.branch_layout == "two_branch" else [fine]
        q_coarse = [torch.clamp(torch.round(coarse / (a / 127.0)), -128, 127) * (a / 127.0) for a in state["coarse"]]
        for i, qf in enumerate(q_fine):
            for j, qc in enumerate(q_coarse):
                state["errors"][i, j] += float((act(qf + qc) - target).double().pow(2).sum())

    def start_branch_scoring(self, per_channel: bool = True) -> None:
        """Candidate thresholds per branch from its histogram: its maximum, high percentiles, the threshold of
        least squared error of the branch alone, and the maximum / sqrt(2)^k for k = 1..8. Why the short ones:
        where the branches cancel (a large center tap against a large bias), the sum that survives the ReLU can
        be a fraction of each branch's range, and clipping a branch where the sum is negative costs nothing.
        Also prepares the one-conv alternative: the kernel on one min-max grid (`per_channel` or per tensor)."""
        candidates = []
        for observer in self.branch_calibration["observers"]:
            top = observer.amax(CalibrationConfig(method="minmax", bits=8, signed=True))
            amaxes = {top, observer.amax(CalibrationConfig(method="mse", bits=8, signed=True))}
            amaxes |= {observer.amax(CalibrationConfig(method="percentile", bits=8, signed=True, percentile=p))
                       for p in (99.9, 99.99, 99.999)}
            amaxes |= {top * 2 ** (-k / 2) for k in range(1, 9)}
            candidates.append(sorted((a for a in amaxes if a > 0), reverse=True) or [1.0])   # largest first
        if self.branch_layout == "residual":   # the fine output is not requantized: one placeholder scale
            candidates[0] = [127.0]
        single = quantize_weight(self.weight.detach(), "minmax", self.w_bits, per_channel)
        single_bias = None
        if self.bias is not None:
            step = self.input_quantizer.scale * single.scale
            single_bias = torch.round(self.bias.detach() / step) * step
        self.branch_calibration = {"stage": "score", "fine": candidates[0], "coarse": candidates[1],
                                   "errors": np.zeros((len(candidates[0]), len(candidates[1]))),
                                   "activation": self.branch_calibration.get("activation", _identity),
                                   "generator": torch.Generator().manual_seed(0), "single": single,
                                   "single_weight": single.dequantize().to(self.weight.dtype),
                                   "single_bias": single_bias, "single_error": 0.0, "count": 0}

    @torch.no_grad()
    def finish_branch_calibration(self, fallback: bool = True) -> dict[str, Any]:
        """Keep the pair of thresholds with the least output error (ties: the larger, less clipping), or, with
        `fallback`, when the one-conv alternative did better still, deploy that instead (`drop_coarse`): the layer
        then runs as one fused int8 conv, faster than two. Returns the layer's errors (mean squared, per output
        element) and the form kept."""
        state = self.branch_calibration
        errors = state["errors"]
        i, j = np.unravel_index(np.argmin(errors), errors.shape)
        count = max(1, state["count"])
        record = {"two_branch_error": float(errors[i, j]) / count, "single_conv_error": state["single_error"] / count}
        self.branch_calibration = {}
        if fallback and state["single_error"] < errors[i, j]:
            self.drop_coarse(state["single"])
            return {**record, "deployed": "single_conv"}
        self.branch_scales.copy_(torch.tensor([state["fine"][i] / 127.0, state["coarse"][j] / 127.0]))
        return {**record, "deployed": self.branch_layout}

    @torch.no_grad()
    def drop_coarse(self, qw: QuantizedWeight) -> None:
        """Turn this CFWS layer into a plain one-conv layer with the (coarse-free) weights `qw`."""
        if qw.coarse_layout is not None:
            raise ValueError("drop_coarse takes a weight without a coarse part")
        for name in ("coarse_codes", "coarse_scale", "branch_scales"):
            if hasattr(self, name):
                delattr(self, name)
        self.__dict__.pop("branch_layout", None)
        self.__dict__.pop("branch_calibration", None)
        self.coarse = None
        self.set_quantized_weight(qw)
        self.fit_bias_to_int32()


BRANCH_SCORE_SAMPLES = 1 << 16


def _identity(x: Tensor) -> Tensor:
    return x


def exact_branches(model: nn.Module) -> None:
    """Put every two-branch layer of `model` back to the exact sum of its branches (no int8 requantization) until
    `calibrate_branches` sets their scales again. Why: bias correction runs between the choice of each layer's
    form and the final branch scales; the bias it writes moves the fine branch, so scales chosen before it would
    clip what it measured."""
    for layer in model.modules():
        if isinstance(layer, QuantConv2d) and layer.two_branch:
            layer.branch_scales.zero_()
            layer.branch_calibration = {"stage": "exact"}


@torch.no_grad()
def calibrate_branches(model: nn.Module, images: Tensor, batch_size: int,
                       activations: dict[nn.Module, Callable[[Tensor], Tensor]] | None = None,
                       per_channel: bool = True, fallback: bool = True) -> dict[str, dict[str, Any]]:
    """Set the int8 output scales of every two-branch layer: one pass gathers each branch's histogram, a second
    scores candidate pairs of thresholds by the error of the layer output (the two requantized branches' sum,
    through the activation that follows the layer in `activations`, if any) on the same images, next to the
    one-conv alternative; with `fallback`, a layer where that alternative does better becomes one conv (see
    `finish_branch_calibration`). During both passes the branches are not requantized. Returns, per layer, its
    errors and the form kept."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantConv2d) and m.two_branch}
    for layer in layers.values():
        layer.branch_scales.zero_()
        layer.branch_calibration = {"stage": "observe", "activation": (activations or {}).get(layer, _identity)}
    was_training = model.training
    model.eval()
    for stage in ("observe", "score"):
        if stage == "score":
            for layer in layers.values():
                layer.start_branch_scoring(per_channel)
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size])
    model.train(was_training)
    return {name: layer.finish_branch_calibration(fallback) for name, layer in layers.items()}


class QuantLinear(SimulatedLinear, QuantWeightMixin):
    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int, coarse: str | None = None) -> "QuantLinear":
        layer = linear_like(cls, linear)
        layer._adopt(linear, w_bits, a_bits, coarse)
        return layer.to(linear.weight.device)


class CodebookWeightMixin:
    """Non-uniform weights (ClusterQAT's deploy form): b-bit indices into a codebook of 2^b float centroids, times
    a float scale per output channel for a per-channel codebook; the input is quantized uniformly per tensor and
    the bias stays float (there is no common integer grid)."""

    weight: Tensor
    bias: Tensor | None

    def _adopt_codebook(self, float_layer: nn.Module, w_bits: int, a_bits: int, per_channel: bool) -> None:
        if not 2 <= w_bits <= 8:
            raise RepqError(f"codebook layers take 2 to 8 weight bits, got {w_bits}")
        with torch.no_grad():
            self.weight.copy_(float_layer.weight)
            if float_layer.bias is not None:
                self.bias.copy_(float_layer.bias)
        self.w_bits, self.coarse = w_bits, None
        self.register_buffer("weight_indices", torch.zeros_like(self.weight, dtype=torch.uint8))
        self.register_buffer("codebook", torch.zeros(2 ** w_bits))
        if per_channel:
            self.register_buffer("channel_scale", torch.ones(self.weight.shape[0]))
        self.input_quantizer = ActQuantizer(a_bits)
        self.use_float_weight = False

    @property
    def per_channel(self) -> bool:
        return "channel_scale" in self._buffers

    @torch.no_grad()
    def set_codebook(self, indices: Tensor, codebook: Tensor, channel_scale: Tensor | None = None) -> None:
        if codebook.numel() != self.codebook.numel() or indices.shape != self.weight.shape:
            raise ValueError("codebook or indices do not match the layer")
        if (channel_scale is None) == self.per_channel:
            raise ValueError("a per-channel codebook layer takes a channel scale, a per-layer one none")
        self.weight_indices.copy_(indices.to(torch.uint8))
        self.codebook.copy_(codebook)
        if channel_scale is not None:
            self.channel_scale.copy_(channel_scale.reshape(-1))

    def effective_weight(self) -> Tensor:
        if self.use_float_weight:
            return self.weight
        weight = self.codebook[self.weight_indices.long()]
        if self.per_channel:
            weight = weight * along_axis(self.channel_scale, weight, 0)
        return weight

    def effective_bias(self) -> Tensor | None:
        return self.bias


class CodebookConv2d(SimulatedConv2d, CodebookWeightMixin):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int, per_channel: bool = False) -> "CodebookConv2d":
        layer = conv_like(cls, conv)
        layer._adopt_codebook(conv, w_bits, a_bits, per_channel)
        return layer.to(conv.weight.device)


class CodebookLinear(SimulatedLinear, CodebookWeightMixin):
    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int, per_channel: bool = False) -> "CodebookLinear":
        layer = linear_like(cls, linear)
        layer._adopt_codebook(linear, w_bits, a_bits, per_channel)
        return layer.to(linear.weight.device)


class QuantGlobalAvgPool(nn.Module):
    """Global average pooling of a quantized input. Integer runtimes requantize the last conv's output before the
    pool (ONNX Runtime: Q -> DQ -> GlobalAveragePool); with this quantization point the last conv runs as a fused
    QLinearConv instead of a slow ConvInteger with a float epilogue."""

    def __init__(self, a_bits: int):
        super().__init__()
        self.input_quantizer = ActQuantizer(a_bits)

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.input_quantizer(x), 1)


def is_global_avg_pool(module: nn.Module) -> bool:
    return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))


UNIFORM_LAYERS = (QuantConv2d, QuantLinear)
CODEBOOK_LAYERS = (CodebookConv2d, CodebookLinear)
QUANT_LAYERS = UNIFORM_LAYERS + CODEBOOK_LAYERS

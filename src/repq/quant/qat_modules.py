"""Quantization-aware training layers (methods.md section 5): fake-quantized conv/linear whose weights go through
an LSQ uniform quantizer (learned per-channel step) or a k-means codebook (ClusterQAT), and whose input goes
through an LSQ per-tensor activation quantizer. Backward is straight-through everywhere.

`repq.qat.convert_qat` turns these into the integer-simulating deploy layers of `repq.quant.modules`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from repq.errors import RepqError
from repq.quant.calibrators import CalibrationConfig, compute_amax
from repq.quant.codebook import assign, kmeans_1d, lloyd_steps
from repq.quant.modules import conv_like, linear_like
from repq.quant.primitives import along_axis, asymmetric_params, int_range, symmetric_scale
from repq.quant.weights import quantize_weight


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: Tensor, factor: float | Tensor) -> Tensor:
    """x forward, factor * gradient backward (LSQ's step-size gradient scale)."""
    return (x - x * factor).detach() + x * factor


def lsq_fake_quantize(x: Tensor, step: Tensor, qmin: int, qmax: int, grad_factor: float,
                      axis: int | None = None, offset: Tensor | None = None) -> Tensor:
    """LSQ (Esser et al. 2020): round(clamp(x / s, qmin, qmax)) * s with a straight-through round, so that
    d/ds = round(x/s) - x/s inside the range and qmin/qmax outside, scaled by `grad_factor`. The step is used as
    |s| (kept off zero): an SGD step that overshoots zero reflects instead of flipping the quantizer's sign.
    With `offset` (LSQ+, per tensor): round(clamp(x / s, qmin - z, qmax - z)) * s with the integer zero point
    z = round(-offset / s), straight-through, its gradient scaled like the step's."""
    s = scale_grad(step, grad_factor).abs().clamp_min(1e-12)
    if offset is not None:
        zero = torch.clamp(round_ste(-scale_grad(offset, grad_factor) / s), qmin, qmax)
        # Clamped to [qmin - z, qmax - z] and rounded without adding z first: in float32, x / s + z can land on a
        # tie the deployed quantizer (round(x / s) + z) never sees, and the two would disagree by one code.
        return round_ste(torch.clamp(x / s, qmin - zero, qmax - zero)) * s
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        s = s.reshape(shape)
    return round_ste(torch.clamp(x / s, qmin, qmax)) * s


class LSQQuantizer(nn.Module):
    """Uniform quantizer with a learned step: per tensor (activations) or per output channel (weights).

    Activation steps start from a PTQ calibrator (`init` method) on the first batch seen in "observe" mode or,
    failing that, on the first training batch; under torchrun rank 0's value is broadcast.

    `affine` (activations, LSQ+ of Bhalgat et al. 2020): an input with negative values gets unsigned codes with a
    zero point and a learned offset (the grid's lower end) instead of a signed symmetric grid. A SiLU output lies
    in [-0.28, max]: the symmetric grid spends half its codes on a side holding nothing below -0.28, so at 4 bits
    its step is about twice the affine one. The zero point is rounded to an integer in the forward (straight
    through), so the deployed integer layer computes the same values.
    """

    def __init__(self, bits: int, signed: bool = True, channels: int | None = None, narrow: bool = False,
                 init: str = "mse", allow_unsigned: bool = False, affine: bool = False):
        super().__init__()
        if affine and channels:
            raise ValueError("affine LSQ quantizes activations (per tensor) only")
        self.bits, self.narrow, self.init_method, self.allow_unsigned = bits, narrow, init, allow_unsigned
        self.step = nn.Parameter(torch.ones(channels) if channels else torch.tensor(1.0))
        if affine:   # the grid's lower end, in input units, and whether the input had negatives (set at init)
            self.offset = nn.Parameter(torch.tensor(0.0))
            self.register_buffer("is_affine", torch.tensor(False))
        self.register_buffer("qmin", torch.tensor(0.0))
        self.register_buffer("qmax", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self._set_range(signed)
        self.mode = "quant"  # quant | observe (initialize on this input, pass it on unquantized)
        self.name = ""

    def _set_range(self, signed: bool) -> None:
        qmin, qmax = int_range(self.bits, signed=signed, narrow=self.narrow)
        self.qmin.fill_(qmin)
        self.qmax.fill_(qmax)

    @property
    def signed(self) -> bool:
        return bool(self.qmin < 0)

    @property
    def affine(self) -> bool:
        """True once initialized on an input with negative values (with `affine=True`)."""
        return hasattr(self, "offset") and bool(self.is_affine)

    def current_step(self) -> Tensor:
        """The step the forward uses (|step|, off zero), detached: what the deploy layer stores."""
        return self.step.detach().abs().clamp_min(1e-12)

    def current_zero_point(self) -> int:
        """The deployed zero point (0 unless the grid is affine): round(-offset / step) inside the code range."""
        if not self.affine:
            return 0
        zero = torch.round(-self.offset.detach() / self.current_step())
        return int(torch.clamp(zero, float(self.qmin), float(self.qmax)))

    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """Step = amax / qmax with amax from the PTQ calibrator (activations: the sign of the data decides). An
        affine quantizer whose input has negative values starts with its lower end at the input's minimum and its
        span from the calibrator on the input shifted by that minimum."""
        if not torch.isfinite(x).all():
            raise RepqError(f"NaN/Inf values at the input of '{self.name}' while initializing QAT; "
                            "check the model weights and the images")
        low = float(x.min())
        affine = hasattr(self, "offset") and low < 0
        signed = not affine and not (self.allow_unsigned and low >= 0)
        self._set_range(signed)
        if hasattr(self, "offset"):
            self.is_affine.fill_(affine)
        if affine:
            span = compute_amax(x - low, CalibrationConfig(method=self.init_method, bits=self.bits, signed=False))
            step, zero_point = asymmetric_params(torch.tensor(low), torch.tensor(low + span), self.bits)
            self.step.copy_(step)
            self.offset.fill_(-float(zero_point) * float(step))
        else:
            amax = compute_amax(x, CalibrationConfig(method=self.init_method, bits=self.bits, signed=signed))
            self.step.copy_(symmetric_scale(torch.tensor(amax), int(self.qmax)))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "observe":
            self.init_from(x)
            return x
        if not bool(self.initialized):
            self.init_from(x)
            if dist.is_initialized():
                extra = (self.offset.data, self.is_affine) if hasattr(self, "offset") else ()
                for t in (self.step.data, self.qmin, self.qmax, *extra):
                    dist.broadcast(t, 0)
        # LSQ's gradient scale 1 / sqrt(N Qp), N = values per step (features per sample, or weights per channel).
        grad_factor = 1.0 / (x[0].numel() * float(self.qmax)) ** 0.5
        axis = None if self.step.dim() == 0 else 0
        return lsq_fake_quantize(x, self.step, int(self.qmin), int(self.qmax), grad_factor, axis,
                                 offset=self.offset if self.affine else None)

    def extra_repr(self) -> str:
        affine = f", zero_point={self.current_zero_point()}" if self.affine else ""
        return f"bits={self.bits}, signed={self.signed}{affine}"


class CodebookQuantizer(nn.Module):
    """Nearest-centroid weight quantizer with a codebook of 2^b values (ClusterQAT).

    "refit": the codebook is a buffer re-fitted by `lloyd_iters` warm-started Lloyd steps every `refit_every`
    training steps; "learned": the codebook is a parameter whose gradient is the sum of the gradients of the
    weights assigned to each centroid, divided by their number [choice]. The latent weights always get the
    straight-through gradient.

    `scale="channel"` [choice]: the codebook holds values of weights divided by their output channel's max |w|
    (re-read from the latent weights at every step), and each channel's weights are its centroids times that
    scale. One codebook in weight units has to cover channels whose ranges differ widely in a fused RepVGG kernel
    (the identity branch's BN scale lands in some channels and not others), so the narrow channels get a handful
    of centroids; normalized, every channel spans the same codebook (the absmax blocks of NF4 do the same). The
    deployed layer stores b-bit indices, the codebook and one float per output channel.
    """

    def __init__(self, weight: Tensor, bits: int, mode: str = "refit", refit_every: int = 100, lloyd_iters: int = 3,
                 init_iters: int = 30, int8_grid: bool = False, scale: str = "layer", grid_bits: int = 8):
        super().__init__()
        if not 2 <= grid_bits <= 8:
            raise RepqError(f"grid_bits must be between 2 and 8, got {grid_bits}")
        if mode not in ("refit", "learned"):
            raise RepqError(f"unknown codebook mode '{mode}'; choose 'refit' or 'learned'")
        if scale not in CODEBOOK_SCALES:
            raise RepqError(f"unknown codebook scale '{scale}'; choose one of {', '.join(CODEBOOK_SCALES)}")
        self.bits, self.mode, self.refit_every, self.lloyd_iters = bits, mode, refit_every, lloyd_iters
        self.int8_grid, self.scale, self.grid_bits = int8_grid, scale, grid_bits
        self.grid_max = 2 ** (grid_bits - 1) - 1   # the largest |code| on the grid: 127, or 63 with reduce_range
        codebook = kmeans_1d(self.normalized(weight), 2 ** bits, init_iters)
        if int8_grid:
            codebook = snap_to_int8_grid(codebook, self.grid_max)
        if mode == "learned":
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))

    def channel_scale(self, w: Tensor) -> Tensor | None:
        """Per-output-channel max |w|, detached (0 for an all-zero channel, which so stays zero); None for a
        per-layer codebook."""
        if self.scale == "layer":
            return None
        return w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)

    def normalized(self, w: Tensor) -> Tensor:
        """The detached weights in codebook units."""
        scale = self.channel_scale(w)
        return w.detach() if scale is None else w.detach() / along_axis(_nonzero(scale), w, 0)

    def indices(self, w: Tensor) -> Tensor:
        """The centroid each weight uses (no refit, no step counted)."""
        return assign(self.normalized(w), self.codebook)

    def forward(self, w: Tensor) -> Tensor:
        values = self.normalized(w)
        if self.training and self.mode == "refit" and self.refit_every > 0:
            if int(self.steps) > 0 and int(self.steps) % self.refit_every == 0:
                refit = lloyd_steps(values, self.codebook, self.lloyd_iters)
                self.codebook.copy_(snap_to_int8_grid(refit, self.grid_max) if self.int8_grid else refit)
            self.steps += 1
        codebook = self.codebook
        if self.int8_grid and self.mode == "learned":   # the learned values move freely; the forward snaps them
            codebook = codebook + (snap_to_int8_grid(codebook, self.grid_max) - codebook).detach()
        idx = assign(values, codebook)
        if self.mode == "learned":
            # The gradient of a centroid is the sum over its weights; divided by their number, a centroid moves at
            # the pace of one weight under the same learning rate (the raw sum scales with the layer size).
            counts = torch.bincount(idx.reshape(-1), minlength=codebook.numel()).clamp_min(1).to(codebook.dtype)
            codebook = scale_grad(codebook, 1.0 / counts)
        scale = self.channel_scale(w)
        if scale is None:
            quantized = codebook[idx]
        elif self.int8_grid:   # int8 codes times each channel's step, computed as the deployed layer computes them
            quantized = self.int8_codes(codebook, idx, scale) * along_axis(self.grid_scale(w), w, 0)
        else:
            quantized = codebook[idx] * along_axis(scale, w, 0)
        return quantized + (w - w.detach())

    def int8_codes(self, codebook: Tensor, idx: Tensor, scale: Tensor | None) -> Tensor:
        """The int8 code of every weight on the codebook's grid (straight-through to the codebook); zero in an
        all-zero channel of a per-channel codebook. Shared by the forward and `convert_qat`."""
        codes = codebook / int8_grid_scale(codebook.detach(), self.grid_max)
        codes = (codes + (torch.round(codes) - codes).detach())[idx]
        return codes if scale is None else codes * along_axis(scale > 0, idx, 0)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, mode={self.mode}, refit_every={self.refit_every}, scale={self.scale}"
                + (f", int8 grid (codes within +-{self.grid_max})" if self.int8_grid else ""))

    def grid_scale(self, w: Tensor | None = None) -> Tensor:
        """The scale of the int8 grid the weights lie on: max |centroid| / grid_max, times each channel's scale
        (per output channel, from the latent weights `w`; 1 for an all-zero channel, whose codes are 0) for a
        per-channel codebook."""
        grid = int8_grid_scale(self.codebook.detach(), self.grid_max)
        scale = None if w is None else self.channel_scale(w)
        if scale is None:
            if self.scale != "layer":
                raise ValueError("a per-channel codebook's grid scale needs the weights")
            return grid
        return grid * _nonzero(scale)


CODEBOOK_SCALES = ("layer", "channel")


def _nonzero(scale: Tensor) -> Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def int8_grid_scale(codebook: Tensor, grid_max: int = 127) -> Tensor:
    amax = codebook.detach().abs().max()
    return torch.where(amax > 0, amax / float(grid_max), torch.ones_like(amax))


def snap_to_int8_grid(codebook: Tensor, grid_max: int = 127) -> Tensor:
    """Centroids moved to the nearest multiple of one per-layer scale (max |centroid| / grid_max): every weight of
    the layer is then an int8 code within +-grid_max times that scale, so the deployed layer runs as a fused int8
    conv while it keeps at most 2^b distinct values (b-bit indices + codebook). grid_max 63 is QATConfig's
    reduce_range (codes exact in ONNX Runtime's u8 x s8 kernels on CPUs without VNNI)."""
    scale = int8_grid_scale(codebook, grid_max)
    return torch.clamp(torch.round(codebook / scale), -grid_max, grid_max) * scale


class QATLayerMixin:
    """Fake-quantized input and weight; with an LSQ weight quantizer or an int8-grid codebook the bias sits on the
    int32 accumulator grid (step = input step x weight step), as the deploy layer computes it."""

    weight: Tensor
    bias: Tensor | None

    def _attach(self, float_layer: nn.Module, weight_quantizer: nn.Module, input_quantizer: LSQQuantizer) -> None:
        with torch.no_grad():
            self.weight.copy_(float_layer.weight)
            if self.bias is not None:
                self.bias.copy_(float_layer.bias)
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    @torch.no_grad()
    def quantized_weight(self) -> Tensor:
        """The weight the forward uses, read without counting a training step (no codebook refit)."""
        was = self.weight_quantizer.training
        self.weight_quantizer.eval()
        try:
            return self.weight_quantizer(self.weight).detach()
        finally:
            self.weight_quantizer.train(was)

    def _weight(self) -> Tensor:
        return self.weight_quantizer(self.weight)

    def _bias(self) -> Tensor | None:
        weight_step = self._weight_step()
        if self.bias is None or weight_step is None:
            return self.bias
        step = self.input_quantizer.current_step() * weight_step
        return round_ste(self.bias / step) * step

    def _weight_step(self) -> Tensor | None:
        """The weight scale of the deployed integer layer (LSQ steps, or the int8 grid of a snapped codebook);
        None for a free codebook, whose deployed layer keeps a float bias."""
        wq = self.weight_quantizer
        if isinstance(wq, LSQQuantizer):
            return wq.current_step()
        return wq.grid_scale(self.weight) if getattr(wq, "int8_grid", False) else None


class QATConv2d(nn.Conv2d, QATLayerMixin):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer: nn.Module, input_quantizer: LSQQuantizer) -> "QATConv2d":
        layer = conv_like(cls, conv)
        layer._attach(conv, weight_quantizer, input_quantizer)
        return layer.to(conv.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x)
        if self.input_quantizer.mode == "observe":  # initialization pass: the float network
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.conv2d(x, self._weight(), self._bias(), self.stride, self.padding, self.dilation, self.groups)


class QATLinear(nn.Linear, QATLayerMixin):
    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: nn.Module, input_quantizer: LSQQuantizer) -> "QATLinear":
        layer = linear_like(cls, linear)
        layer._attach(linear, weight_quantizer, input_quantizer)
        return layer.to(linear.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_quantizer(x)
        if self.input_quantizer.mode == "observe":
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self._weight(), self._bias())


QAT_LAYERS = (QATConv2d, QATLinear)


class QATGlobalAvgPool(nn.Module):
    """Global average pooling of a fake-quantized input (QATConfig.quantize_pool): the deployed model requantizes
    the last conv's output, so that conv runs as a fused integer kernel (see QuantGlobalAvgPool)."""

    def __init__(self, input_quantizer: LSQQuantizer):
        super().__init__()
        self.input_quantizer = input_quantizer

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.input_quantizer(x), 1)


def lsq_weight_quantizer(weight: Tensor, bits: int, init: str = "mse") -> LSQQuantizer:
    """Per-output-channel LSQ weight quantizer (symmetric, narrow range) whose steps start from PTQ's `init`."""
    quantizer = LSQQuantizer(bits, signed=True, channels=weight.shape[0], narrow=True)
    with torch.no_grad():
        quantizer.step.copy_(quantize_weight(weight.detach(), init, bits, per_channel=True).scale)
    quantizer.initialized.fill_(True)
    return quantizer.to(weight.device)

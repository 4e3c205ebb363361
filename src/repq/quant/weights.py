"""Weight quantizers: per-channel/per-tensor min-max, MSE-optimal clipping, and CFWS (methods.md section 2).

Each returns a `QuantizedWeight`: integer codes with their per-output-channel scales, plus, for CFWS, a coarse part
with its own scales: center-only codes O x I x 1 x 1 (k x k kernels), diagonal codes O x 1 x 1 x 1 (a 1x1 kernel
that carries a merged identity branch, as MobileOne's pointwise blocks do), or whole-kernel codes (the ablation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from repq.errors import RepqError
from repq.quant.primitives import channel_amax, dequantize, int_range, quantize, symmetric_scale
from repq.reparam.fold import pad_to

# PTQConfig.reduce_range: int8 weight codes within +-63, so that a u8 x s8 pair sum (255 x 63 x 2 = 32130) fits the
# int16 that x64 CPUs without VNNI add pairs of products in (repq.export.verify.U8S8_EXACT_LIMIT).
REDUCED_WEIGHT_BITS = 7
WEIGHT_METHODS = ("minmax", "mse", "cfws", "cfws_whole")
COARSE_LAYOUTS = ("center", "diagonal", "whole")
# A 1x1 kernel "carries a merged identity" when its diagonal holds the largest |w| of at least this share of the
# output channels. Chance puts it there in 1 / (inputs per group) of them; a merged identity (t0 added on the
# diagonal) in most (measured: 46-97 % in MobileOne's pointwise blocks, at most 5 % in the YOLOv6-style head stems;
# docs/results/identity_diagonal.md).
IDENTITY_DIAGONAL_SHARE = 0.25


@dataclass
class QuantizedWeight:
    codes: Tensor                      # fine / only codes, shape of the weight
    scale: Tensor                      # (O,)
    coarse_codes: Tensor | None = None  # (O, I, 1, 1) center codes, (O, 1, 1, 1) diagonal codes, or the full kernel
    coarse_scale: Tensor | None = None  # (O,)
    layout: str | None = None          # "center" | "diagonal" | "whole"; None: inferred from the coarse codes' shape

    @property
    def coarse_layout(self) -> str | None:
        """None (no coarse part), "center" (CFWS: 1x1 codes on the center taps), "diagonal" (CFWS on a 1x1 kernel
        with a merged identity: one code per output channel, on its own input channel) or "whole" (the ablation)."""
        if self.coarse_codes is None:
            return None
        if self.layout is not None:
            return self.layout
        return "center" if self.coarse_codes.shape[-1] == 1 else "whole"

    def coarse(self, kernel_size: int | None = None) -> Tensor | None:
        """The dequantized coarse part in the weight's shape (center padded to the kernel, diagonal expanded)."""
        if self.coarse_codes is None:
            return None
        coarse = dequantize(self.coarse_codes, self.coarse_scale, 0.0, axis=0)
        if self.coarse_layout == "diagonal":
            return expand_diagonal(coarse, self.codes.shape)
        return pad_to(coarse, kernel_size) if kernel_size and coarse.dim() == 4 else coarse

    def fine(self) -> Tensor:
        return dequantize(self.codes, self.scale, 0.0, axis=0)

    def dequantize(self) -> Tensor:
        coarse = self.coarse(self.codes.shape[-1] if self.codes.dim() == 4 else None)
        return self.fine() if coarse is None else self.fine() + coarse


def diagonal_index(shape: torch.Size | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(output, input-within-group) indices of the identity positions of an O x I/g x 1 x 1 kernel with O = I:
    output channel o reads its own input channel o, which is number o mod (I/g) of its group."""
    out = torch.arange(shape[0])
    return out, out % shape[1]


def expand_diagonal(diagonal: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """An O x 1 x 1 x 1 diagonal part written into a zero kernel of `shape` (O x I/g x 1 x 1)."""
    full = diagonal.new_zeros(shape)
    o, i = diagonal_index(shape)
    full[o, i, 0, 0] = diagonal.reshape(-1)
    return full


def identity_diagonal_share(w: Tensor, groups: int = 1) -> float | None:
    """Share of output channels whose largest |w| sits on the identity diagonal of a 1x1 conv kernel with O = I
    (at least 2 inputs per group); None for any other kernel."""
    if w.dim() != 4 or w.shape[-2:] != (1, 1) or w.shape[1] < 2 or w.shape[0] != w.shape[1] * groups:
        return None
    o, i = diagonal_index(w.shape)
    magnitude = w.detach().abs()
    return float((magnitude[o, i, 0, 0] >= magnitude.flatten(1).amax(dim=1)).float().mean())


def carries_identity(w: Tensor, groups: int = 1) -> bool:
    """True for a 1x1 conv kernel whose diagonal holds the largest |w| in at least IDENTITY_DIAGONAL_SHARE of the
    output channels: the signature of a merged identity branch."""
    share = identity_diagonal_share(w, groups)
    return share is not None and share >= IDENTITY_DIAGONAL_SHARE


def _symmetric(w: Tensor, amax: Tensor, bits: int, rounding: str = "half_even") -> tuple[Tensor, Tensor]:
    qmin, qmax = int_range(bits, signed=True, narrow=True)
    scale = symmetric_scale(amax, qmax)
    return quantize(w, scale, 0.0, qmin, qmax, axis=0, rounding=rounding), scale


def quantize_minmax(w: Tensor, bits: int = 8, per_channel: bool = True) -> QuantizedWeight:
    return quantize_minmax_at(w, channel_amax(w, per_channel), bits)


def quantize_mse(w: Tensor, bits: int = 8, per_channel: bool = True, grid: int = 100,
                 min_ratio: float = 0.2) -> QuantizedWeight:
    """Search a clipping ratio of max|w| in [min_ratio, 1] that minimizes the squared error (per channel)."""
    qmin, qmax = int_range(bits, signed=True, narrow=True)
    flat = w.detach().reshape(w.shape[0], -1)
    amax = channel_amax(w, per_channel)
    ratios = torch.linspace(min_ratio, 1.0, grid, dtype=flat.dtype)
    scales = symmetric_scale(amax[None, :] * ratios[:, None], qmax)                 # (grid, O)
    fq = torch.clamp(torch.round(flat[None] / scales[..., None]), qmin, qmax) * scales[..., None]
    err = (fq - flat[None]).pow(2).sum(dim=2)                                         # (grid, O)
    if not per_channel:
        err = err.sum(dim=1, keepdim=True).expand_as(err)
    best = err.argmin(dim=0)
    return quantize_minmax_at(w, amax * ratios[best], bits)


def quantize_minmax_at(w: Tensor, amax: Tensor, bits: int) -> QuantizedWeight:
    codes, scale = _symmetric(w, amax, bits)
    return QuantizedWeight(codes, scale)


def _split(w: Tensor, taps: Tensor, put_back, bits: int, per_channel: bool, layout: str) -> QuantizedWeight:
    """CFWS's split: the `taps` (O x ... x 1 x 1, where the merge adds the identity / 1x1 branches) get coarse codes
    s_c n_c (round half up); `put_back(fine_input, residual)` writes taps - s_c n_c into a copy of the kernel, which
    is quantized per channel as the fine part."""
    coarse_codes, coarse_scale = _symmetric(taps, channel_amax(taps, per_channel), bits, rounding="half_up")
    fine_input = w.clone()
    put_back(fine_input, taps - dequantize(coarse_codes, coarse_scale, 0.0, axis=0))
    fine_codes, fine_scale = _symmetric(fine_input, channel_amax(fine_input, True), bits)
    return QuantizedWeight(fine_codes, fine_scale, coarse_codes, coarse_scale, layout=layout)


def quantize_cfws(w: Tensor, bits: int = 8, per_channel: bool = True) -> QuantizedWeight:
    """Coarse & fine weight splitting of a k x k kernel (k odd, k > 1).

    The center taps C get a coarse int code s_c n_c (round half up); the residual C - s_c n_c goes back at the
    center and the whole kernel is quantized per channel as the fine part. Center tap = s_c n_c + s_f n_f.
    """
    if w.dim() != 4 or w.shape[-1] != w.shape[-2] or w.shape[-1] % 2 == 0 or w.shape[-1] < 3:
        raise RepqError(f"CFWS needs a square odd k x k conv kernel with k >= 3, got shape {tuple(w.shape)}")
    c = w.shape[-1] // 2

    def put_back(fine_input: Tensor, residual: Tensor) -> None:
        fine_input[:, :, c:c + 1, c:c + 1] = residual
    return _split(w, w[:, :, c:c + 1, c:c + 1], put_back, bits, per_channel, "center")


def quantize_cfws_diagonal(w: Tensor, bits: int = 8, per_channel: bool = True) -> QuantizedWeight:
    """CFWS on a 1x1 kernel that carries a merged identity (MobileOne's pointwise blocks): the merge adds the
    identity's BN scale t0 on the diagonal, where a 3x3 kernel gets it at the center. The diagonal taps get one
    coarse code per output channel; the rest is CFWS's split. The coarse part runs as a depthwise 1x1 conv: O extra
    multiply-adds per pixel against O x I/g for the layer."""
    o, i = diagonal_index(w.shape)

    def put_back(fine_input: Tensor, residual: Tensor) -> None:
        fine_input[o, i] = residual.reshape(-1, 1, 1)
    return _split(w, w[o, i].reshape(-1, 1, 1, 1), put_back, bits, per_channel, "diagonal")


def quantize_cfws_whole(w: Tensor, bits: int = 8, per_channel: bool = True) -> QuantizedWeight:
    """Ablation: the coarse part is the whole kernel quantized per channel, the fine part its rounding residual."""
    def put_back(fine_input: Tensor, residual: Tensor) -> None:
        fine_input.copy_(residual)
    return _split(w, w, put_back, bits, per_channel, "whole")


def quantize_weight(w: Tensor, method: str, bits: int = 8, per_channel: bool = True, groups: int = 1
                    ) -> QuantizedWeight:
    """Dispatch by method name. CFWS applies to k x k kernels (k >= 3) and to 1x1 kernels that carry a merged
    identity (`carries_identity`, with the conv's `groups`); other layers fall back to per-channel min-max."""
    if not torch.isfinite(w).all():
        raise RepqError("weight has NaN/Inf values; fix or retrain the model before quantizing")
    if method == "minmax":
        return quantize_minmax(w, bits, per_channel)
    if method == "mse":
        return quantize_mse(w, bits, per_channel)
    if method in ("cfws", "cfws_whole"):
        if method == "cfws" and carries_identity(w, groups):
            return quantize_cfws_diagonal(w, bits, per_channel)
        if w.dim() != 4 or w.shape[-1] < 3:
            return quantize_minmax(w, bits, per_channel=True)
        return (quantize_cfws if method == "cfws" else quantize_cfws_whole)(w, bits, per_channel)
    raise RepqError(f"unknown weight method '{method}'; choose one of {', '.join(WEIGHT_METHODS)}")


def cfws_split(weight: Tensor, bits: int = 8, per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """The dequantized coarse (center-only) and fine parts of a CFWS-quantized kernel; coarse + fine ~ weight."""
    q = quantize_cfws(weight, bits, per_channel)
    return q.coarse(weight.shape[-1]), q.fine()

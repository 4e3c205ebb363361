"""Uniform quantizer primitives: integer ranges, scales, quantize -> integer codes -> dequantize.

Codes are returned as float tensors holding integers (exact up to 2^24) so the same code path serves simulation
and export; `to_int` casts them for storage.
"""
from __future__ import annotations

import torch
from torch import Tensor

ROUNDING = ("half_even", "half_up")


def int_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer code range: signed [-2^(b-1), 2^(b-1)-1] (narrow: symmetric [-(2^(b-1)-1), ...]), unsigned [0, 2^b-1]."""
    if not 2 <= bits <= 16:
        raise ValueError(f"bit-width must be between 2 and 16, got {bits}")
    if not signed:
        return 0, 2 ** bits - 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


def round_codes(x: Tensor, rounding: str = "half_even") -> Tensor:
    if rounding == "half_even":
        return torch.round(x)
    if rounding == "half_up":
        return torch.floor(x + 0.5)
    raise ValueError(f"unknown rounding '{rounding}'; choose one of {ROUNDING}")


def along_axis(param: Tensor | float, x: Tensor, axis: int | None) -> Tensor:
    """`param` shaped to broadcast against `x` along `axis` (per-channel values), or as is for a scalar/None axis."""
    param = torch.as_tensor(param, dtype=x.dtype, device=x.device)
    if axis is None or param.dim() == 0:
        return param
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def quantize(x: Tensor, scale: Tensor | float, zero_point: Tensor | float, qmin: int, qmax: int,
             axis: int | None = None, rounding: str = "half_even") -> Tensor:
    """Integer codes clamp(round(x / scale) + zero_point, qmin, qmax); `axis` selects per-channel parameters."""
    s, z = along_axis(scale, x, axis), along_axis(zero_point, x, axis)
    return torch.clamp(round_codes(x / s, rounding) + z, qmin, qmax)


def dequantize(codes: Tensor, scale: Tensor | float, zero_point: Tensor | float, axis: int | None = None) -> Tensor:
    return (codes - along_axis(zero_point, codes, axis)) * along_axis(scale, codes, axis)


def fake_quantize(x: Tensor, scale: Tensor | float, zero_point: Tensor | float, qmin: int, qmax: int,
                  axis: int | None = None, rounding: str = "half_even") -> Tensor:
    return dequantize(quantize(x, scale, zero_point, qmin, qmax, axis, rounding), scale, zero_point, axis)


def symmetric_scale(amax: Tensor, qmax: int) -> Tensor:
    """scale = amax / qmax, with scale 1 where amax is 0 (the codes are then all 0: no division by zero)."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def asymmetric_params(xmin: Tensor, xmax: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Affine (scale, zero_point) for unsigned codes covering [min(xmin, 0), max(xmax, 0)] (0 exactly representable)."""
    qmin, qmax = int_range(bits, signed=False)
    xmin = torch.clamp(torch.as_tensor(xmin, dtype=torch.float32), max=0.0)
    xmax = torch.clamp(torch.as_tensor(xmax, dtype=torch.float32), min=0.0)
    span = xmax - xmin
    scale = torch.where(span > 0, span / (qmax - qmin), torch.ones_like(span))
    zero_point = torch.clamp(torch.round(qmin - xmin / scale), qmin, qmax)
    return scale, zero_point


def channel_amax(w: Tensor, per_channel: bool) -> Tensor:
    """max |w| per output channel (dim 0), or one value broadcast to every channel."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    return amax if per_channel else amax.max().expand_as(amax).clone()

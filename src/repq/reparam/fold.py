"""Pure functions for BN folding and branch merging (methods.md section 1).

Every function takes and returns plain tensors so that it can be tested against a hand computation and reused by
any block layout (repq's own, the original RepVGG, timm, YOLOv6...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    """The folded per-channel scale t = gamma / sqrt(var + eps); a BN may override it (OABN clips it)."""
    folded = getattr(bn, "folded_scale", None)
    if callable(folded):
        return folded()
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps)


def fold_bn(kernel: Tensor, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """BN(K * x) = (t K) * x + (beta - t mu): returns the folded kernel and bias."""
    t = bn_scale(bn)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(t)
    return kernel * t.reshape(-1, 1, 1, 1), beta - t * bn.running_mean


def identity_kernel(channels: int, groups: int, kernel_size: int = 3, like: Tensor | None = None) -> Tensor:
    """The k x k grouped-conv kernel E that computes the identity: E[o, o mod (C/g), c, c] = 1."""
    in_per_group = channels // groups
    kernel = torch.zeros(channels, in_per_group, kernel_size, kernel_size)
    if like is not None:
        kernel = kernel.to(dtype=like.dtype, device=like.device)
    center = kernel_size // 2
    rows = torch.arange(channels)
    kernel[rows, rows % in_per_group, center, center] = 1.0
    return kernel


def pad_to(kernel: Tensor, kernel_size: int) -> Tensor:
    """Zero-pad a smaller odd kernel (e.g. 1x1) to kernel_size x kernel_size around its center."""
    pad = (kernel_size - kernel.shape[-1]) // 2
    if pad < 0:
        raise ValueError(f"cannot pad a {kernel.shape[-1]}x{kernel.shape[-1]} kernel down to {kernel_size}")
    return F.pad(kernel, [pad, pad, pad, pad])


def merge_branches(branches: list[tuple[Tensor, Tensor]], kernel_size: int) -> tuple[Tensor, Tensor]:
    """Sum parallel (kernel, bias) branches that see the same input: W = sum pad(K_i), b = sum b_i."""
    if not branches:
        raise ValueError("merge_branches needs at least one branch")
    weight = sum(pad_to(k, kernel_size) for k, _ in branches)
    bias = sum(b for _, b in branches)
    return weight, bias

"""Activation calibrators: choose the clipping threshold (amax) of a per-tensor activation quantizer.

One entry point, `compute_amax(x, CalibrationConfig)`, with the methods of methods.md section 3: min-max,
percentile, MSE-optimal search, classic entropy (TensorRT-style KL over |x|) and the improved KL of P1
(ReLU-fused, float64 log-difference, masked empty bins, optional dropping of exact zeros).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from repq.errors import RepqError

ACTIVATION_METHODS = ("minmax", "percentile", "mse", "kl", "improved_kl")


@dataclass(frozen=True)
class CalibrationConfig:
    method: str = "improved_kl"
    bits: int = 8
    signed: bool = True            # signed codes: 2^(b-1) levels on the positive side; unsigned: 2^b
    bins: int = 2048
    percentile: float = 99.99
    drop_zeros: bool = True        # improved KL: leave exact zeros (post-ReLU) out of the histogram
    fuse_relu: bool = True         # improved KL: only the positive side shapes the threshold
    kl_epsilon: float = 1e-4       # classic KL: smoothing of empty bins (on counts)
    min_per_bin: float = 8.0       # KL methods: fewer bins when samples are scarce (sparse histograms pick
                                   # thresholds far too small); never fewer than the number of levels

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) if self.signed else 2 ** self.bits


def _histogram(values: Tensor, bins: int) -> tuple[np.ndarray, float]:
    """Counts over [0, max(values)] and the bin width."""
    top = float(values.max()) if values.numel() else 0.0
    if top <= 0.0:
        return np.zeros(bins), 0.0
    counts = torch.histc(values.float(), bins=bins, min=0.0, max=top).double().numpy()
    return counts, top / bins


def minmax_amax(x: Tensor) -> float:
    return float(x.abs().max())


def percentile_amax(x: Tensor, percentile: float) -> float:
    flat = x.detach().abs().flatten()
    k = max(1, min(flat.numel(), int(np.ceil(percentile / 100.0 * flat.numel()))))
    return float(flat.kthvalue(k).values)


def mse_amax(x: Tensor, cfg: CalibrationConfig) -> float:
    """Threshold minimizing the expected squared quantization error, evaluated on a |x| histogram."""
    counts, width = _histogram(x.detach().abs().flatten(), cfg.bins)
    if width == 0.0:
        return 0.0
    centers = (np.arange(cfg.bins) + 0.5) * width
    qmax = cfg.levels - 1
    candidates = np.arange(1, cfg.bins + 1) * width                                    # bin right edges
    scales = candidates / qmax
    codes = np.minimum(np.round(centers[None, :] / scales[:, None]), qmax)
    err = ((codes * scales[:, None] - centers[None, :]) ** 2 * counts[None, :]).sum(axis=1)
    return float(candidates[int(np.argmin(err))])


def _expand_groups(counts: np.ndarray, levels: int, nonzero: np.ndarray) -> np.ndarray:
    """Merge `counts` into `levels` groups and spread each group's mass uniformly over the bins where `nonzero`.

    `nonzero` is taken from P (tail folded in), as in TensorRT/MXNet: the edge bin that received the clipped mass
    keeps a share of Q, so clipping is always paid for, even when that bin of the raw histogram is empty."""
    n = counts.size
    group = (np.arange(n) * levels) // n
    mass = np.bincount(group, weights=counts, minlength=levels)
    occupied = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
    spread = np.divide(mass, occupied, out=np.zeros_like(mass), where=occupied > 0)
    return np.where(nonzero, spread[group], 0.0)


def _smooth(p: np.ndarray, eps: float) -> np.ndarray | None:
    zeros = p == 0
    n_zero, n_nonzero = int(zeros.sum()), int((~zeros).sum())
    if n_nonzero == 0:
        return None
    correction = eps * n_zero / n_nonzero
    return p + eps * zeros - correction * (~zeros)


def kl_bins(num_values: int, cfg: CalibrationConfig) -> int:
    """The histogram size used by the KL methods: cfg.bins, reduced (in powers of two) to keep on average
    `min_per_bin` samples per bin, but never below the number of quantization levels."""
    bins = cfg.bins
    while bins > cfg.levels and num_values < cfg.min_per_bin * bins:
        bins //= 2
    return max(bins, cfg.levels)


def _search_threshold(counts: np.ndarray, width: float, levels: int, divergence) -> float:
    """Scan candidate thresholds i = levels..bins: P = counts[:i] with the tail folded into bin i-1, Q = counts[:i]
    merged into `levels` groups; return (argmin divergence(P, Q) + 0.5) * bin width. The divergence receives
    unnormalized counts."""
    best_div, best_i = np.inf, counts.size
    tail = np.cumsum(counts[::-1])[::-1]                       # tail[i] = counts[i:].sum()
    for i in range(levels, counts.size + 1):
        p = counts[:i].copy()
        if i < counts.size:
            p[i - 1] += tail[i]
        q = _expand_groups(counts[:i], levels, nonzero=p > 0)
        if p.sum() == 0 or q.sum() == 0:
            continue
        div = divergence(p, q)
        if div < best_div:
            best_div, best_i = div, i
    return (best_i + 0.5) * width


def _smoothed_kl(p: np.ndarray, q: np.ndarray, eps: float) -> float:
    """KL(p || q) after giving empty bins `eps` counts (taken from the non-empty ones), as TensorRT/MXNet do."""
    ps, qs = _smooth(p, eps), _smooth(q, eps)
    if ps is None or qs is None or (ps <= 0).any() or (qs <= 0).any():
        return np.inf
    ps, qs = ps / ps.sum(), qs / qs.sum()
    return float(np.sum(ps * np.log(ps / qs)))


def _masked_kl(p: np.ndarray, q: np.ndarray) -> float:
    """P1's form: float64 log p - log q, summed only where both distributions are non-zero."""
    p, q = p / p.sum(), q / q.sum()
    both = (p > 0) & (q > 0)
    return float(np.sum(p[both] * (np.log(p[both]) - np.log(q[both]))))


def kl_amax(x: Tensor, cfg: CalibrationConfig) -> float:
    """Classic entropy calibration over |x| (TensorRT / MXNet style, epsilon-smoothed log ratio)."""
    values = x.detach().abs().flatten()
    counts, width = _histogram(values, kl_bins(values.numel(), cfg))
    if width == 0.0:
        return 0.0
    return _search_threshold(counts, width, cfg.levels, lambda p, q: _smoothed_kl(p, q, cfg.kl_epsilon))


def improved_kl_amax(x: Tensor, cfg: CalibrationConfig) -> float:
    """Improved KL of P1: histogram of ReLU(x), KL = sum p (log p - log q) over bins where both are > 0."""
    values = x.detach().flatten()
    values = torch.relu(values) if cfg.fuse_relu else values.abs()
    if cfg.drop_zeros:
        values = values[values != 0]
    counts, width = _histogram(values, kl_bins(values.numel(), cfg))
    if width == 0.0:
        return 0.0
    return _search_threshold(counts, width, cfg.levels, _masked_kl)


def compute_amax(x: Tensor, cfg: CalibrationConfig) -> float:
    """The clipping threshold of `x` under `cfg.method`; the scale is then amax / qmax."""
    if x.numel() == 0:
        raise RepqError("cannot calibrate on an empty tensor; give at least one calibration image")
    if not torch.isfinite(x).all():
        raise RepqError("activations contain NaN/Inf during calibration; check the model weights and input data")
    if cfg.method == "minmax":
        return minmax_amax(x)
    if cfg.method == "percentile":
        return percentile_amax(x, cfg.percentile)
    if cfg.method == "mse":
        return mse_amax(x, cfg)
    if cfg.method == "kl":
        return kl_amax(x, cfg)
    if cfg.method == "improved_kl":
        return improved_kl_amax(x, cfg)
    raise RepqError(f"unknown activation method '{cfg.method}'; choose one of {', '.join(ACTIVATION_METHODS)}")

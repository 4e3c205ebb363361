"""Activation calibrators: choose the clipping threshold (amax) of a per-tensor activation quantizer.

`HistogramObserver` streams a tensor's statistics over batches (min, max, a histogram of |x| and one of the
positive side), so calibration memory does not grow with the number of images. `observer.amax(cfg)` then applies
one method of methods.md section 3: min-max, percentile, MSE-optimal search, classic entropy (TensorRT-style KL over
|x|) and P1's improved KL (positive side, P1's normalization). `compute_amax(x, cfg)` does both for one tensor.
`auto` (the default of repq.quantize) is not a single-tensor method: it scores these candidates by what the
activation feeds (repq.quant.selection).
"""
from __future__ import annotations

import functools

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from repq.errors import RepqError

SINGLE_METHODS = ("minmax", "percentile", "mse", "kl", "improved_kl")
ACTIVATION_METHODS = ("auto",) + SINGLE_METHODS
INPUT_METHODS = ("affine",) + SINGLE_METHODS   # the network input: "affine" spans its [min, max] (repq.quant.selection)
KL_NORMALIZATIONS = ("p1", "separate")


@dataclass(frozen=True)
class CalibrationConfig:
    method: str = "improved_kl"
    bits: int = 8
    signed: bool = True            # signed codes: 2^(b-1) levels on the positive side; unsigned: 2^b
    bins: int = 2048
    percentile: float = 99.99
    drop_zeros: bool = True        # improved KL: leave exact zeros out (= P1's histogram of the conv output, whose
                                   # ReLU has not yet turned the negative side into zeros)
    fuse_relu: bool = True         # improved KL: only the positive side shapes the threshold
    kl_epsilon: float = 1e-4       # classic KL: smoothing of empty bins (on counts)
    kl_normalization: str = "p1"   # improved KL: "p1" = P1's safe_entropy_numpy (p and q each scaled by the
                                   # *other* sum: an explicit clipping penalty); "separate" = repq's former form
                                   # (masked textbook KL of separately normalized p and q), kept as an ablation
    min_per_bin: float = 0.0       # KL methods: > 0 halves the bins until that many samples per bin remain (repq's
                                   # former default 8, an ablation); 0 keeps the fixed `bins` as P1 and TensorRT do

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) if self.signed else 2 ** self.bits


class HistogramObserver:
    """Running statistics of a tensor over batches: exact min / max / counts, and two histograms over [0, top]
    (|x|, and the strictly positive values) whose range grows as larger values arrive; old counts are then
    re-binned by their bin centers (exact when everything arrives in one batch)."""

    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.min, self.max, self.absmax = float("inf"), float("-inf"), 0.0
        self.numel = self.zeros = 0
        self.abs_hist, self.abs_top = np.zeros(bins), 0.0
        self.pos_hist, self.pos_top = np.zeros(bins), 0.0

    def update(self, x: Tensor, name: str = "") -> None:
        """Add a batch; `name` (the layer whose input `x` is) only goes into the error for NaN/Inf values."""
        x = x.detach().float().flatten()
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            if name:
                raise RepqError(f"NaN/Inf activations at the input of '{name}' during calibration; "
                                "check the model weights and the calibration images")
            raise RepqError("activations contain NaN/Inf during calibration; check the model weights and input data")
        self.numel += x.numel()
        self.zeros += int((x == 0).sum())
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
        magnitudes = x.abs()
        self.absmax = max(self.absmax, float(magnitudes.max()))
        self.abs_hist, self.abs_top = self._accumulate(self.abs_hist, self.abs_top, magnitudes)
        self.pos_hist, self.pos_top = self._accumulate(self.pos_hist, self.pos_top, x[x > 0])

    def _accumulate(self, hist: np.ndarray, top: float, values: Tensor) -> tuple[np.ndarray, float]:
        if values.numel() == 0:
            return hist, top
        new_top = max(top, float(values.max()))
        if new_top <= 0.0:
            return hist, top
        if new_top > top and hist.any():
            centers = (np.arange(self.bins) + 0.5) * (top / self.bins)
            index = np.minimum((centers / (new_top / self.bins)).astype(np.int64), self.bins - 1)
            hist = np.bincount(index, weights=hist, minlength=self.bins)
        counts = torch.histc(values, bins=self.bins, min=0.0, max=new_top).double().numpy()
        return hist + counts, new_top

    @property
    def nonnegative(self) -> bool:
        return self.numel > 0 and self.min >= 0.0

    def amax(self, cfg: CalibrationConfig) -> float:
        """The clipping threshold under `cfg.method` (0.0 for an all-zero tensor: the scale guard takes over)."""
        if self.numel == 0:
            raise RepqError("cannot calibrate on an empty tensor; give at least one calibration image")
        if self.absmax == 0.0:
            return 0.0
        if cfg.method == "minmax":
            return self.absmax
        if cfg.method == "percentile":
            return histogram_percentile(self.abs_hist, self.abs_top, cfg.percentile)
        if cfg.method == "mse":
            return mse_threshold(self.abs_hist, self.abs_top / self.bins, cfg.levels)
        if cfg.method == "kl":
            counts, width = _rebin(self.abs_hist, self.abs_top, kl_bins(self.numel, cfg))
            return search_threshold(counts, width, cfg.levels, "smoothed", cfg.kl_epsilon)
        if cfg.method == "improved_kl":
            return self._improved_kl(cfg)
        raise RepqError(f"unknown activation method '{cfg.method}'; choose one of {', '.join(SINGLE_METHODS)}")

    def _improved_kl(self, cfg: CalibrationConfig) -> float:
        if cfg.fuse_relu:
            hist, top = self.pos_hist.copy(), self.pos_top
            if not cfg.drop_zeros:
                hist[0] += self.zeros
        else:  # both sides shape the threshold: |x|, minus the exact zeros when they are dropped
            hist, top = self.abs_hist.copy(), self.abs_top
            if cfg.drop_zeros:
                hist[0] = max(0.0, hist[0] - self.zeros)
        if top <= 0.0 or hist.sum() == 0:
            return 0.0 if top <= 0.0 else top
        values = int(hist.sum())
        counts, width = _rebin(hist, top, kl_bins(values, cfg))
        if cfg.kl_normalization not in KL_NORMALIZATIONS:
            raise RepqError(f"unknown kl_normalization '{cfg.kl_normalization}'; "
                            f"choose one of {', '.join(KL_NORMALIZATIONS)}")
        return search_threshold(counts, width, cfg.levels, cfg.kl_normalization)


def _rebin(hist: np.ndarray, top: float, bins: int) -> tuple[np.ndarray, float]:
    """Merge a histogram over [0, top] into `bins` equal bins (bins divides its size)."""
    if bins == hist.size:
        return hist, top / hist.size
    return hist.reshape(bins, hist.size // bins).sum(axis=1), top / bins


def histogram_percentile(hist: np.ndarray, top: float, percentile: float) -> float:
    """The value below which `percentile` % of the histogram's mass lies (linear inside the bin)."""
    total = hist.sum()
    if total == 0 or top <= 0.0:
        return 0.0
    width = top / hist.size
    cum = np.cumsum(hist)
    target = percentile / 100.0 * total
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, hist.size - 1)
    before = cum[i - 1] if i > 0 else 0.0
    inside = (target - before) / hist[i] if hist[i] > 0 else 1.0
    return float(min(top, (i + min(max(inside, 0.0), 1.0)) * width))


def mse_threshold(hist: np.ndarray, width: float, levels: int, stride: int = 16) -> float:
    """The bin edge minimizing the expected squared rounding + clipping error over a |x| histogram (bin centers),
    on the grid of `levels` positive levels. Coarse to fine: every `stride`-th edge, then every edge within a
    stride of the best coarse one."""
    bins = hist.size
    centers = (np.arange(bins) + 0.5) * width
    qmax = levels - 1

    def errors(edges: np.ndarray) -> np.ndarray:
        scales = edges * width / qmax
        codes = np.minimum(np.round(centers[None, :] / scales[:, None]), qmax)
        return ((codes * scales[:, None] - centers[None, :]) ** 2 * hist[None, :]).sum(axis=1)

    coarse = np.arange(stride, bins + 1, stride) if bins > 4 * stride else np.arange(1, bins + 1)
    best = int(coarse[int(np.argmin(errors(coarse)))])
    fine = np.arange(max(1, best - stride), min(bins, best + stride) + 1)
    return float(fine[int(np.argmin(errors(fine)))] * width)


def kl_bins(num_values: int, cfg: CalibrationConfig) -> int:
    """The histogram size of the KL methods: cfg.bins, or (min_per_bin > 0, an ablation) halved while fewer than
    `min_per_bin` samples per bin remain, never below the number of quantization levels."""
    bins = cfg.bins
    if cfg.min_per_bin > 0:
        while bins > cfg.levels and num_values < cfg.min_per_bin * bins:
            bins //= 2
    return max(bins, min(cfg.levels, cfg.bins))


def _bounds(levels: int, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last bin of group g for each candidate size i: ceil(g i / L), ceil((g+1) i / L)."""
    i, g = sizes[:, None], np.arange(levels)[None, :]
    return (g * i + levels - 1) // levels, ((g + 1) * i + levels - 1) // levels


@functools.lru_cache(maxsize=16)
def _group_bounds(levels: int, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    """`_bounds` for sizes first..last, computed once per layout (every search of a run scans the same sizes)."""
    lo, hi = _bounds(levels, np.arange(first, last + 1))
    lo.flags.writeable = hi.flags.writeable = False
    return lo, hi


def _is_range(sizes: np.ndarray) -> bool:
    return sizes.size > 1 and int(sizes[-1] - sizes[0]) == sizes.size - 1 and bool((np.diff(sizes) == 1).all())


def _group_terms(counts: np.ndarray, levels: int, sizes: np.ndarray) -> dict[str, np.ndarray]:
    """Per candidate size i (rows) and group g (columns) of the threshold search, from prefix sums: Q's mass of
    each group (the raw counts[:i]; group g holds bins ceil(g i / L) .. ceil((g+1) i / L) - 1), P's mass (the same,
    plus the clipped tail counts[i:] in the last group, where P's edge bin i-1 lies), the number of bins where P is
    non-zero, and Q's value on them (mass / that number: Q is spread over P's non-empty bins, so the edge bin that
    holds the clipped mass keeps a share of Q and clipping is always paid for)."""
    cs = np.concatenate([[0.0], np.cumsum(counts)])
    cnz = np.concatenate([[0], np.cumsum(counts > 0)])
    lo, hi = _group_bounds(levels, int(sizes[0]), int(sizes[-1])) if _is_range(sizes) else _bounds(levels, sizes)
    mass = cs[hi] - cs[lo]
    occupied = (cnz[hi] - cnz[lo]).astype(np.float64)
    tail = cs[-1] - cs[sizes]
    edge = counts[sizes - 1] + tail                          # P's edge bin
    occupied[:, -1] += (counts[sizes - 1] == 0) & (tail > 0)
    p_mass = mass.copy()
    p_mass[:, -1] += tail
    spread = np.divide(mass, occupied, out=np.zeros_like(mass), where=occupied > 0)
    return {"cs": cs, "mass": mass, "p_mass": p_mass, "occupied": occupied, "spread": spread, "edge": edge,
            "tail": tail}


def _safe_log(x: np.ndarray) -> np.ndarray:
    return np.log(np.where(x > 0, x, 1.0))


def masked_kl_by_groups(counts: np.ndarray, levels: int, sizes: np.ndarray, normalization: str) -> np.ndarray:
    """The improved-KL divergence of every candidate size in `sizes`, summed over bins where p != 0 and q != 0:
    "p1" = P1's `safe_entropy_numpy` ("ours calculation of kl-div"), sum p (log(p_sum p) - log(q_sum q)) / p_sum on
    unnormalized counts; "separate" = the masked KL of separately normalized p and q (repq's former form). Since
    Q is constant inside a group and P equals the counts except at the edge bin, sum p log p and sum p log q reduce
    to prefix sums and per-group sums (candidates x levels, not candidates x bins).

    P1's form equals the separate one plus 2 m_p log(p_sum / q_sum), m_p the masked share of P: P carries the
    clipped tail and Q does not, so that term is about twice the clipped fraction, an explicit clipping penalty."""
    t = _group_terms(counts, levels, sizes)
    cs = t["cs"]
    clogc = np.concatenate([[0.0], np.cumsum(np.where(counts > 0, counts * _safe_log(counts), 0.0))])
    kept = t["spread"] > 0                                   # bins of a group with no Q mass are masked away
    edge = t["edge"]
    edge_kept = kept[:, -1] & (edge > 0)
    a = clogc[sizes - 1] + np.where(edge_kept, edge * _safe_log(edge), 0.0)       # sum_mask p log p
    pm = cs[sizes - 1] + np.where(edge_kept, edge, 0.0)                             # sum_mask p
    b = np.where(kept, t["p_mass"] * _safe_log(t["spread"]), 0.0).sum(axis=1)       # sum_mask p log q
    p_sum, q_sum = cs[-1], cs[sizes]
    log_p, log_q = np.log(p_sum), _safe_log(q_sum)
    if normalization == "p1":
        div = (a + pm * log_p - b - pm * log_q) / p_sum
    else:
        div = (a - pm * log_p - b + pm * log_q) / p_sum
    return np.where(q_sum > 0, div, np.inf)


def smoothed_kl_by_groups(counts: np.ndarray, levels: int, sizes: np.ndarray, eps: float) -> np.ndarray:
    """Classic entropy calibration (TensorRT/MXNet) for every candidate size: the empty bins of P and of Q (among
    the first i) get `eps`, taken evenly (d_p, d_q) from their non-empty bins, then KL(P || Q) of the normalized
    results; inf where smoothing leaves a bin <= 0 or P is empty. Smoothing keeps the sums, so
    KL = (sum ps log ps - sum ps log qs) / p_sum + log(q_sum / p_sum); empty bins of both contribute nothing. The
    P terms (c - d_p) log(c - d_p) of the integer counts c >= 1 use the series
    c log c - d (log c + 1) + sum_k d^k / (k (k-1) c^(k-1)) (k = 2..8; d_p <= eps * bins < 1, so the truncation
    error is below 1e-9 per bin), whose coefficients are prefix sums."""
    t = _group_terms(counts, levels, sizes)
    cs, edge, spread, occupied = t["cs"], t["edge"], t["spread"], t["occupied"]
    n_valid = sizes.astype(np.float64)
    nz = np.concatenate([[0], np.cumsum(counts > 0)]).astype(np.float64)
    p_nonzero = nz[sizes - 1] + (edge > 0)                   # bins of P (first i) that hold mass
    p_zero = n_valid - p_nonzero
    q_lost = (spread[:, -1] == 0) & (edge > 0)               # the edge bin, when its group has no Q mass
    q_nonzero = p_nonzero - q_lost
    with np.errstate(divide="ignore", invalid="ignore"):
        d_p = eps * p_zero / p_nonzero
        d_q = eps * (n_valid - q_nonzero) / q_nonzero
    positive = counts > 0
    logc = _safe_log(counts)
    series = [np.concatenate([[0.0], np.cumsum(np.where(positive, counts * logc, 0.0))]),
              np.concatenate([[0.0], np.cumsum(np.where(positive, logc + 1.0, 0.0))])]
    inverse = np.where(positive, 1.0 / np.where(positive, counts, 1.0), 0.0)
    powers = [np.concatenate([[0.0], np.cumsum(inverse ** (k - 1))]) for k in range(2, 9)]
    j = sizes - 1                                            # non-edge bins are 0 .. i-2
    p_log_p = series[0][j] - d_p * series[1][j]
    for k, prefix in zip(range(2, 9), powers):
        p_log_p = p_log_p + d_p ** k / (k * (k - 1)) * prefix[j]
    edge_s = edge - d_p
    p_log_p = p_log_p + np.where(edge > 0, edge_s * _safe_log(edge_s), 0.0)
    q_s = spread - d_q[:, None]                              # Q's smoothed value on P's non-empty bins
    kept = spread > 0
    p_group = t["p_mass"] - d_p[:, None] * occupied          # sum of smoothed P over those bins
    p_log_q = np.where(kept, p_group * _safe_log(q_s), 0.0).sum(axis=1)
    p_log_q = p_log_q + np.where(q_lost, edge_s * np.log(eps), 0.0)
    p_sum, q_sum = cs[-1], cs[sizes]
    bad = (p_nonzero == 0) | (q_nonzero == 0) | (edge_s <= 0) & (edge > 0) | (kept & (q_s <= 0)).any(axis=1)
    div = (p_log_p - p_log_q) / p_sum + _safe_log(q_sum) - np.log(p_sum)
    return np.where(bad, np.inf, div)


def search_threshold(counts: np.ndarray, width: float, levels: int, divergence: str = "p1",
                     eps: float = 1e-4) -> float:
    """Scan the candidate sizes i = levels..bins: P = counts[:i] with the tail counts[i:] folded into bin i-1,
    Q = counts[:i] merged into `levels` groups, spread over P's non-empty bins; return (argmin + 0.5) * bin width,
    ties going to the larger threshold. `divergence`: "p1", "separate" or "smoothed" (classic KL)."""
    n = counts.size
    levels = min(levels, n)
    counts = counts.astype(np.float64)
    if counts.sum() == 0:
        return float(n * width)
    sizes = np.arange(levels, n + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        if divergence in KL_NORMALIZATIONS:
            divs = masked_kl_by_groups(counts, levels, sizes, divergence)
        else:
            divs = smoothed_kl_by_groups(counts, levels, sizes, eps)
    divs = np.where(np.isnan(divs), np.inf, divs)
    if not np.isfinite(divs).any():
        return float(n * width)
    best = divs.min()
    i = sizes[np.flatnonzero(divs <= best + 1e-12 * abs(best))[-1]]   # ties (to rounding): the larger
    return float((i + 0.5) * width)


def compute_amax(x: Tensor, cfg: CalibrationConfig) -> float:
    """The clipping threshold of one tensor `x` under `cfg.method`; the scale is then amax / qmax."""
    if x.numel() == 0:
        raise RepqError("cannot calibrate on an empty tensor; give at least one calibration image")
    observer = HistogramObserver(cfg.bins)
    observer.update(x)
    return observer.amax(cfg)

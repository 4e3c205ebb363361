"""Activation calibrators on synthetic data with known answers; the improved KL against a plain re-implementation."""
import math

import numpy as np
import pytest
import torch

import repq
from repq.quant.calibrators import CalibrationConfig, compute_amax, kl_bins


def cfg(method, **kw):
    return CalibrationConfig(method=method, **kw)


@pytest.fixture(scope="module")
def uniform():
    return torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 4.0


@pytest.fixture(scope="module")
def heavy_tailed():
    """Mostly |N(0,1)| after ReLU, plus a few huge outliers (0.01% of values up to 100)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(200_000, generator=gen))
    x[:20] = torch.linspace(30, 100, 20)
    return x


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "kl", "improved_kl"])
def test_uniform_keeps_about_its_max(uniform, method):
    amax = compute_amax(uniform, cfg(method))
    assert 0.97 * 4.0 <= amax <= 4.0 * 1.001


@pytest.mark.parametrize("method", ["percentile", "kl", "improved_kl"])
def test_heavy_tail_is_clipped(heavy_tailed, method):
    # (MSE rightly keeps these few far outliers at 8 bits; its optimum is checked by brute force below)
    amax = compute_amax(heavy_tailed, cfg(method))
    assert amax < 10.0  # far below the outliers at 30..100
    assert amax > 1.5   # but keeps the bulk of a half-normal
    assert compute_amax(heavy_tailed, cfg("minmax")) == pytest.approx(100.0)


def raw_mse(x, amax, qmax=127):
    s = amax / qmax
    return float(((torch.clamp(torch.round(x / s), -128, qmax) * s - x) ** 2).mean())


def test_mse_search_finds_the_brute_force_minimizer(heavy_tailed):
    x = heavy_tailed
    scan = np.linspace(0.5, 100.0, 4000)
    brute = min(raw_mse(x, a) for a in scan)
    found = compute_amax(x, cfg("mse"))
    assert raw_mse(x, found) <= brute * 1.02


def reference_improved_kl(values: np.ndarray, bins=2048, levels=128):
    """methods.md section 3, steps 2-5, written with explicit loops."""
    values = values[values > 0]
    top = values.max()
    width = top / bins
    hist = np.zeros(bins)
    for v in values:
        hist[min(int(v / width), bins - 1)] += 1
    best, best_i = math.inf, bins
    for i in range(levels, bins + 1):
        p = list(hist[:i])
        p[i - 1] += hist[i:].sum()
        q = [0.0] * i
        for g in range(levels):
            lo, hi = math.ceil(g * i / levels), math.ceil((g + 1) * i / levels)
            nonzero = [j for j in range(lo, hi) if p[j] > 0]   # P's support: the folded edge bin counts
            for j in nonzero:
                q[j] = hist[lo:hi].sum() / len(nonzero)
        ps, qs = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0 and qj > 0:
                kl += (pj / ps) * (math.log(pj / ps) - math.log(qj / qs))
        if kl < best:
            best, best_i = kl, i
    return (best_i + 0.5) * width


def test_improved_kl_matches_reference_implementation():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40_000, generator=gen) * torch.rand(40_000, generator=gen) * 2  # post-conv like, signed
    x[:5] = 25.0
    small = CalibrationConfig(method="improved_kl", bins=512, min_per_bin=0)
    expected = reference_improved_kl(x.numpy().astype(np.float64), bins=512)
    # histc and the loop can put values sitting exactly on a bin edge in neighbouring bins: allow one bin
    assert compute_amax(x, small) == pytest.approx(expected, abs=float(x.max()) / 512 + 1e-6)


def test_improved_kl_options():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(100_000, generator=gen)
    fused = compute_amax(x, cfg("improved_kl"))
    abs_based = compute_amax(x, cfg("improved_kl", fuse_relu=False))
    assert fused > 0 and abs_based > 0
    assert compute_amax(torch.zeros(100), cfg("improved_kl")) == 0.0
    unsigned = CalibrationConfig(method="improved_kl", signed=False)
    assert unsigned.levels == 256 and CalibrationConfig().levels == 128
    top = float(x.max())
    for config in (unsigned, cfg("improved_kl")):  # the scan starts at L bins: threshold >= (L + 0.5) bin widths
        assert compute_amax(torch.relu(x), config) >= (config.levels + 0.5) * top / 2048 * 0.999


def test_kl_bins_shrink_for_scarce_samples():
    c = CalibrationConfig()
    assert kl_bins(10**6, c) == 2048
    assert kl_bins(2048, c) == 256
    assert kl_bins(10, c) == 128


def test_bad_activations_are_refused():
    with pytest.raises(repq.RepqError, match="empty"):
        compute_amax(torch.tensor([]), cfg("minmax"))
    with pytest.raises(repq.RepqError, match="NaN/Inf"):
        compute_amax(torch.tensor([1.0, float("nan")]), cfg("kl"))
    with pytest.raises(repq.RepqError, match="unknown activation method"):
        compute_amax(torch.ones(3), cfg("omse"))

"""Activation calibrators on synthetic data with known answers; the improved KL against a plain re-implementation."""
import math

import numpy as np
import pytest
import torch

import repq
from repq.quant.calibrators import (CalibrationConfig, HistogramObserver, compute_amax, kl_bins, masked_kl_by_groups,
                                    search_threshold, smoothed_kl_by_groups)


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


def p1_kl(p, q):
    """P1's safe_entropy_numpy written out: sum over p != 0 and q != 0 of p*(log(P*p) - log(Q*q)) / P."""
    P, Q = sum(p), sum(q)
    return sum(pj * (math.log(P * pj) - math.log(Q * qj)) for pj, qj in zip(p, q) if pj != 0 and qj != 0) / P


def separate_kl(p, q):
    P, Q = sum(p), sum(q)
    return sum((pj / P) * (math.log(pj / P) - math.log(qj / Q)) for pj, qj in zip(p, q) if pj > 0 and qj > 0)


def reference_search(hist, levels, divergence):
    """methods.md section 3 with explicit loops: P = hist[:i] with the tail folded into bin i-1; Q = hist[:i] in
    `levels` groups spread over P's non-empty bins; ties go to the larger i. Returns (best i, divergence by i)."""
    bins = len(hist)
    best, best_i, divs = math.inf, bins, {}
    for i in range(levels, bins + 1):
        p = list(hist[:i])
        p[i - 1] += sum(hist[i:])
        q = [0.0] * i
        for g in range(levels):
            lo, hi = math.ceil(g * i / levels), math.ceil((g + 1) * i / levels)
            nonzero = [j for j in range(lo, hi) if p[j] > 0]   # P's support: the folded edge bin counts
            for j in nonzero:
                q[j] = sum(hist[lo:hi]) / len(nonzero)
        if sum(p) == 0 or sum(q) == 0:
            continue
        divs[i] = divergence(p, q)
        if divs[i] <= best:
            best, best_i = divs[i], i
    return best_i, divs


def reference_improved_kl(values: np.ndarray, bins=2048, levels=128, divergence=p1_kl):
    values = values[values > 0]
    width = values.max() / bins
    hist = [0.0] * bins
    for v in values:
        hist[min(int(v / width), bins - 1)] += 1
    return (reference_search(hist, levels, divergence)[0] + 0.5) * width


@pytest.mark.parametrize("normalization,divergence", [("p1", p1_kl), ("separate", separate_kl)])
def test_improved_kl_matches_reference_implementation(normalization, divergence):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40_000, generator=gen) * torch.rand(40_000, generator=gen) * 2  # post-conv like, signed
    x[:5] = 25.0
    small = CalibrationConfig(method="improved_kl", bins=512, kl_normalization=normalization)
    expected = reference_improved_kl(x.numpy().astype(np.float64), bins=512, divergence=divergence)
    # histc and the loop can put values sitting exactly on a bin edge in neighbouring bins: allow one bin
    assert compute_amax(x, small) == pytest.approx(expected, abs=float(x.max()) / 512 + 1e-6)


HAND_MADE = {
    # a bulk, then empty bins, then a few outliers: at thresholds below them the tail bin of the raw histogram is
    # empty, so only the folded P carries the clipped mass
    "empty_tail": [50, 80, 60, 40, 30, 20, 10, 5, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
    # a spike of exact zeros (drop_zeros=False keeps them in bin 0)
    "zero_spike": [5000, 40, 35, 30, 28, 20, 18, 12, 10, 9, 7, 5, 4, 4, 3, 2, 2, 1, 1, 1, 0, 1, 0, 1],
}


@pytest.mark.parametrize("name", sorted(HAND_MADE))
@pytest.mark.parametrize("divergence", ["p1", "separate"])
def test_threshold_search_matches_loops_on_hand_made_histograms(name, divergence):
    hist = np.array(HAND_MADE[name], dtype=float)
    levels = 4
    expected_i, _ = reference_search(list(hist), levels, p1_kl if divergence == "p1" else separate_kl)
    assert search_threshold(hist, 0.5, levels, divergence) == pytest.approx((expected_i + 0.5) * 0.5)


def test_p1_divergence_charges_for_clipping():
    hist = list(map(float, HAND_MADE["empty_tail"]))
    _, p1 = reference_search(hist, 4, p1_kl)
    _, sep = reference_search(hist, 4, separate_kl)
    total = sum(hist)
    for i in p1:
        clipped = sum(hist[i:])
        # P1's normalization = masked KL + 2 m_p log(P/Q): a positive price whenever mass is clipped
        if clipped > 0:
            assert p1[i] > sep[i]
            assert p1[i] - sep[i] == pytest.approx(2 * math.log(total / (total - clipped)), rel=0.05)
        else:
            assert p1[i] == pytest.approx(sep[i], abs=1e-12)
    # the penalty never moves the threshold down
    assert search_threshold(np.array(hist), 1.0, 4, "p1") >= search_threshold(np.array(hist), 1.0, 4, "separate")
    # with 10 % of the mass in the far tail, the separate form clips it free of charge; P1's keeps the range
    heavy = np.array(hist[:-1] + [30.0])
    for levels in (4, 8):
        assert search_threshold(heavy, 1.0, levels, "p1") == pytest.approx(len(heavy) + 0.5)
        assert search_threshold(heavy, 1.0, levels, "separate") < len(heavy) * 0.65


@pytest.mark.parametrize("name", sorted(HAND_MADE) + ["random"])
@pytest.mark.parametrize("kind", ["p1", "separate", "smoothed"])
def test_divergence_of_every_candidate_equals_the_loops(name, kind):
    """Not only the argmin: the vectorized divergence of each candidate size equals the loop's value."""
    rng = np.random.default_rng(0)
    hist = np.array(HAND_MADE[name], dtype=float) if name in HAND_MADE else np.floor(
        rng.exponential(30, 96) * np.exp(-np.arange(96) / 20))
    levels = 8
    loop = {"p1": p1_kl, "separate": separate_kl, "smoothed": smoothed_kl_loop}[kind]
    _, expected = reference_search(list(hist), levels, loop)
    sizes = np.arange(levels, len(hist) + 1)
    if kind == "smoothed":
        got = smoothed_kl_by_groups(hist, levels, sizes, 1e-4)
    else:
        got = masked_kl_by_groups(hist, levels, sizes, kind)
    for i, value in zip(sizes, got):
        if i in expected and math.isfinite(expected[i]):
            assert value == pytest.approx(expected[i], rel=1e-7, abs=1e-12), i
        else:
            assert not math.isfinite(value), i


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


def test_kl_bins_fixed_unless_the_ablation_asks():
    c = CalibrationConfig()
    assert kl_bins(10**6, c) == kl_bins(2048, c) == kl_bins(10, c) == 2048    # P1: always 2048
    shrink = CalibrationConfig(min_per_bin=8)
    assert kl_bins(10**6, shrink) == 2048
    assert kl_bins(2048, shrink) == 256
    assert kl_bins(10, shrink) == 128


def test_observer_accumulates_batches(heavy_tailed):
    """Streaming over batches: exact extrema and counts; thresholds as for the whole tensor when the first batch
    holds the maximum (no re-binning), within a few bins otherwise."""
    whole = HistogramObserver()
    whole.update(heavy_tailed)
    first_max = HistogramObserver()
    for part in heavy_tailed.chunk(7):
        first_max.update(part)
    reordered = HistogramObserver()
    for part in heavy_tailed.flip(0).chunk(7):
        reordered.update(part)
    for obs in (first_max, reordered):
        assert (obs.min, obs.max, obs.numel, obs.zeros) == (whole.min, whole.max, whole.numel, whole.zeros)
    for method in ("minmax", "percentile", "mse", "kl", "improved_kl"):
        assert first_max.amax(cfg(method)) == pytest.approx(whole.amax(cfg(method)), rel=1e-9)
        assert reordered.amax(cfg(method)) == pytest.approx(whole.amax(cfg(method)), abs=4 * 100.0 / 2048)


def test_histogram_percentile_is_close_to_the_exact_one(heavy_tailed):
    for pct in (99.0, 99.9, 99.99):
        exact = float(np.percentile(heavy_tailed.numpy(), pct))
        assert compute_amax(heavy_tailed, cfg("percentile", percentile=pct)) == pytest.approx(
            exact, abs=100.0 / 2048 + 1e-3)


def test_bad_activations_are_refused():
    with pytest.raises(repq.RepqError, match="empty"):
        compute_amax(torch.tensor([]), cfg("minmax"))
    with pytest.raises(repq.RepqError, match="NaN/Inf"):
        compute_amax(torch.tensor([1.0, float("nan")]), cfg("kl"))
    with pytest.raises(repq.RepqError, match="unknown activation method"):
        compute_amax(torch.ones(3), cfg("omse"))


def smoothed_kl_loop(p, q, eps=1e-4):
    """TensorRT/MXNet's smoothing written out: empty bins get eps, taken evenly from the non-empty ones."""
    def smooth(d):
        zeros = sum(1 for v in d if v == 0)
        nonzero = len(d) - zeros
        if nonzero == 0:
            return None
        return [eps if v == 0 else v - eps * zeros / nonzero for v in d]
    ps, qs = smooth(p), smooth(q)
    if ps is None or qs is None or min(ps) <= 0 or min(qs) <= 0:
        return math.inf
    P, Q = sum(ps), sum(qs)
    return sum((a / P) * math.log((a / P) / (b / Q)) for a, b in zip(ps, qs))


@pytest.mark.parametrize("name", sorted(HAND_MADE))
def test_classic_kl_search_matches_loops(name):
    hist = np.array(HAND_MADE[name], dtype=float)
    expected_i, _ = reference_search(list(hist), 4, smoothed_kl_loop)
    assert search_threshold(hist, 0.5, 4, "smoothed") == pytest.approx((expected_i + 0.5) * 0.5)

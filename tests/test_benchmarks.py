"""Every benchmark script runs in --quick mode (tiny digits model) and prints its table."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")  # the quick reference model is trained once for all scripts


@pytest.mark.slow
@pytest.mark.parametrize("script,needle", [("train_reference.py", "fused (plain 3x3 convs)"),
                                           ("train_zoo.py", "| quick_efficientrep | efficientrep_n |"),
                                           ("ptq_benchmark.py",
                                            "| W4A8 | repq default (equalization + CFWS + auto + bias correction) | 2 |"),
                                           ("calibration_benchmark.py", "| stage4.0.rbr_reparam |"),
                                           ("ptq_timing.py", "| quick_a0 (digits 8x8) | 32 |"),
                                           ("export_benchmark.py", "ORT quantize_static MinMax"),
                                           ("peer_benchmark.py", "PyTorch FX PTQ"),
                                           ("qat_benchmark.py", "| OABN relative | cluster | W4A4 |"),
                                           ("fusion_benchmark.py", "| same, ConvTranspose2d upsampling kept in float |"),
                                           ("calibration_coverage.py", "| calibration seed | outlier images"),
                                           ("scale_benchmark.py", "| DataLoader workers | images/s |"),
                                           ("cfws_deploy_benchmark.py", "two-branch - exact: mean"),
                                           ("cluster_grid_benchmark.py", "Cost of the snap (int8 - free, top-1)"),
                                           ("cfws_deploy_224.py", "| CFWS two-branch | QLinearConv "),
                                           ("detection_benchmark.py", "| two_branch |"),
                                           ("identity_diagonal.py", "| model | square 1x1 convs |"),
                                           ("saturation_benchmark.py", "| CFWS two-branch | 7-bit (reduce_range) | 63 |")])
def test_quick_mode(script, needle, cache):
    env = {**os.environ, "REPQ_CACHE": str(cache)}
    results = BENCH.parent / "docs" / "results"
    before = {p: p.stat().st_mtime for p in results.glob("*")} if results.exists() else {}
    out = subprocess.run([sys.executable, script, "--quick"], cwd=BENCH, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert needle in out.stdout
    after = {p: p.stat().st_mtime for p in results.glob("*")} if results.exists() else {}
    assert after == before  # --quick never overwrites the recorded results


def test_cfws_deploy_seed_sweep_summary_by_hand(monkeypatch):
    """The seed-sweep section: per-model mean and worst seed of two-branch - exact, from numbers chosen here."""
    monkeypatch.syspath_prepend(str(BENCH))
    from cfws_deploy_benchmark import render_seed_sweep
    labels = ("cfws exact", "cfws two-branch", "minmax/channel + percentile")
    rows = [{"model": "m1", "sim": dict(zip(labels, (90.0, 89.8, 89.0)))},
            {"model": "m2", "sim": dict(zip(labels, (80.0, 80.1, 80.5)))},
            {"model": "m3", "sim": dict(zip(labels, (70.0, 70.0, 70.0)))}]   # no extra seeds: left out
    sweep = {"seeds": [1, 2], "command": "CMD", "machine": "M",
             "top1": {"m1": {"1": dict(zip(labels, (90.2, 90.2, 89.0))), "2": dict(zip(labels, (90.0, 90.3, 89.1)))},
                      "m2": {"1": dict(zip(labels, (80.2, 80.0, 80.0))), "2": dict(zip(labels, (80.0, 80.0, 80.0)))}}}
    text = "\n".join(render_seed_sweep(rows, sweep))
    # m1: gaps -0.2, 0.0, +0.3 -> mean +0.033, worst -0.20; vs min-max +0.8, +1.2, +1.2 -> mean +1.07, worst +0.80
    assert "| m1 | 90.07 | 90.10 | +0.03 / -0.20 | +1.07 / +0.80 |" in text
    # m2: gaps +0.1, -0.2, 0.0 -> mean -0.033, worst -0.20; vs min-max -0.4, 0.0, 0.0 -> mean -0.13, worst -0.40
    assert "| m2 | 80.07 | 80.03 | -0.03 / -0.20 | -0.13 / -0.40 |" in text
    assert "| m3 |" not in text
    assert re.search(r"zoo mean [+-]0\.000, worst model -0\.03 pt", text) and "worst model -0.13 pt" in text


def test_saturation_page_summary_by_hand(monkeypatch):
    """The saturation page's accuracy table: 7-bit - 8-bit per model (mean / worst seed) and over the zoo, from
    numbers chosen here."""
    monkeypatch.syspath_prepend(str(BENCH))
    from saturation_benchmark import RECIPES, render
    two, mm = RECIPES
    ort = {"largest_code": 127, "default": 50.0, "exact option": 90.0, "same_prediction": 60.0}
    rows = [{"model": "m1", "fp": 91.0,
             "sim": {f"{two} | 8-bit": {"0": 90.0, "1": 90.4}, f"{two} | 7-bit (reduce_range)": {"0": 89.8, "1": 90.6},
                     f"{mm} | 8-bit": {"0": 88.0, "1": 88.0}, f"{mm} | 7-bit (reduce_range)": {"0": 87.5, "1": 88.1}},
             "ort": {f"{r} | {w}": ort for r in RECIPES for w in ("8-bit", "7-bit (reduce_range)")}}]
    text = render({"accuracy": {"command": "CMD", "machine": "M", "cpu": "C", "seeds": [0, 1], "rows": rows}})
    # two-branch: -0.2 and +0.2 -> mean +0.00, worst -0.20; min-max: -0.5 and +0.1 -> mean -0.20, worst -0.50
    # ONNX Runtime (seed 0) against the simulation's seed 0: 90.0 - 90.0 (8-bit), 50.0 - 89.8 (7-bit)
    assert (f"| m1 | 91.00 | {two} | 90.20 | 90.20 | +0.00 / -0.20 | 50.00 | 90.00 (+0.00) | 60.00% | "
            "50.00 (-39.80) | 60.00% |") in text
    assert f"| m1 | 91.00 | {mm} | 88.00 | 87.80 | -0.20 / -0.50 |" in text
    assert f"{mm}: 7-bit - 8-bit weights over 1 models x 2 seeds: mean -0.200, worst -0.50 pt" in text

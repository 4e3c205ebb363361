"""Every benchmark script runs in --quick mode (tiny digits model) and prints its table."""
import os
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
                                           ("identity_diagonal.py", "| model | square 1x1 convs |")])
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

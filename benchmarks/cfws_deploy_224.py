"""CFWS deployments at ImageNet size: throughput in ONNX Runtime of a full-width RepVGG-A0 at 224x224 (1000
classes) as FP32, exact CFWS, two-branch CFWS, per-channel min-max INT8 and ClusterQAT W4A8 on the int8 grid (the last
three also with 7-bit weights, reduce_range), at batch 64 and 1. The zoo's 28x28
models (cfws_deploy.md) are small enough to be bound by ONNX Runtime's per-node cost; this is the compute-bound
case. Speed does not depend on the weights: the model is untrained (seeded) and calibrated on 32 seeded random
images, so no accuracy is reported.

    python benchmarks/cfws_deploy_224.py           # ~15 min on 2 cores, writes docs/results/cfws_deploy_224.*
    python benchmarks/cfws_deploy_224.py --quick   # quarter-width A0 at 64x64, prints only
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import PLAIN, cpu_line, interleaved_throughput, kernel_counts, machine, repq, write_result
from repq.export import export_onnx

MINMAX = "min-max/channel + percentile"
RECIPES = {"CFWS exact": {"cfws_deploy": "exact"}, "CFWS two-branch": {"cfws_deploy": "two_branch"},
           MINMAX: {**PLAIN, "weight": "minmax", "activation": "percentile"}}
SEVEN_BIT = ", 7-bit"   # the same recipes with reduce_range: codes within +-63, fast and exact without VNNI
RECIPES.update({label + SEVEN_BIT: {**RECIPES[label], "reduce_range": True}
                for label in ("CFWS two-branch", MINMAX)})
# ClusterQAT W4A8 on the int8 grid, converted right after prepare_qat (speed does not depend on training; its
# accuracy is in cluster_grid.md)
CLUSTER = "ClusterQAT W4A8, int8 grid"
QAT_RECIPES = {CLUSTER: {}, CLUSTER + SEVEN_BIT: {"reduce_range": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved measurements per figure (median)")
    args = parser.parse_args()
    size, seconds = (64, 0.3) if args.quick else (224, args.seconds)
    torch.manual_seed(0)   # --quick: a quarter-width, 10-class A0, enough to run every step in the test suite
    model = repq.create_model("repvgg_a0", **({"num_classes": 10, "width_scale": 0.25} if args.quick
                                              else {"num_classes": 1000})).eval()
    calib = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(0))
    tmp = Path(tempfile.mkdtemp(prefix="repq-cfws-224-"))
    paths = {"FP32": export_onnx(repq.reparameterize(model, calib[:2]), tmp / "fp32.onnx", calib[:1],
                                 allow_float=True)}
    for label, options in RECIPES.items():
        q = repq.quantize(model, calib, repq.PTQConfig(quantize_pool=True, **options))
        paths[label] = export_onnx(q, tmp / f"{label.replace(' ', '_').replace('/', '_')}.onnx", calib[:1])
    for label, options in QAT_RECIPES.items():
        qat = repq.prepare_qat(model, repq.QATConfig(method="cluster", w_bits=4, a_bits=8, codebook_grid="int8",
                                                     quantize_pool=True, **options), calib)
        paths[label] = export_onnx(repq.convert_qat(qat), tmp / f"cluster_{len(paths)}.onnx", calib[:1])
    repeats = 1 if args.quick else args.repeats
    speeds = {b: interleaved_throughput(paths, [3, size, size], b, seconds, repeats) for b in (64, 1)}
    rows = {}
    for label, path in paths.items():
        kernels = kernel_counts(path)
        rows[label] = {"kernels": {k: kernels[k] for k in ("QLinearConv", "QLinearAdd", "ConvInteger")},
                       "images_per_s": {b: speeds[b][label] for b in (64, 1)}}
        print(label, rows[label], flush=True)
    cmd = "python benchmarks/cfws_deploy_224.py" + (" --quick" if args.quick else "")
    width = "quarter width, 10" if args.quick else "full width, 1000"
    lines = [f"# INT8 deployments at {size}x{size}: RepVGG-A0 ({width} classes) in ONNX Runtime", "",
             f"Command: `{cmd}`", f"Machine: {machine()}; {cpu_line()}; ONNX Runtime CPU provider, 2 threads, "
             f"session option session.x64quantprecision=1 (repq's sessions: exact u8 x s8 products on CPUs without "
             f"VNNI, where the layers with weight codes beyond +-64 run on slower u8 x u8 kernels); random inputs, "
             f"each figure the median of {repeats} interleaved {seconds:g}-s measurements", "",
             f"Rows marked '{SEVEN_BIT[2:]}' are quantized with `reduce_range=True` (`repq ptq --reduce-range`): "
             "weight codes within +-63, which the fast kernels multiply exactly; the others have 8-bit codes. "
             "'vs min-max' compares with the min-max model of the same weight width. The ClusterQAT rows are "
             "converted right after `prepare_qat` (4-bit codebooks on one int8 grid per layer, 8-bit edge layers, "
             "quantized pool input): their speed does not depend on training (cluster_grid.md has their accuracy).",
             "",
             "| model | kernels | images/s b=64 | images/s b=1 | b=64 vs FP32 | b=64 vs min-max |", "|---|" + "---|" * 5]
    for label, r in rows.items():
        k = ", ".join(f"{n} {v}" for n, v in r["kernels"].items() if v) or "float"
        s = r["images_per_s"]
        mm = rows[MINMAX + SEVEN_BIT if label.endswith(SEVEN_BIT) else MINMAX]["images_per_s"]
        lines.append(f"| {label} | {k} | {s[64]:.1f} | {s[1]:.1f} | {s[64] / rows['FP32']['images_per_s'][64]:.2f}x | "
                     + (f"{s[64] / mm[64]:.2f}x |" if label != "FP32" else "- |"))
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("cfws_deploy_224", text, {"command": cmd, "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()

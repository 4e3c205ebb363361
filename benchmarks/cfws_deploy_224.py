"""CFWS deployments at ImageNet size: throughput in ONNX Runtime of a full-width RepVGG-A0 at 224x224 (1000
classes) as FP32, exact CFWS, two-branch CFWS and per-channel min-max INT8, at batch 64 and 1. The zoo's 28x28
models (cfws_deploy.md) are small enough to be bound by ONNX Runtime's per-node cost; this is the compute-bound
case. Speed does not depend on the weights: the model is untrained (seeded) and calibrated on 32 seeded random
images, so no accuracy is reported.

    python benchmarks/cfws_deploy_224.py           # ~3 min on 2 cores, writes docs/results/cfws_deploy_224.*
    python benchmarks/cfws_deploy_224.py --quick   # 64x64, prints only
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import PLAIN, kernel_counts, machine, repq, write_result
from repq.export import export_onnx
from repq.export.bench import throughput

RECIPES = {"CFWS exact": {"cfws_deploy": "exact"}, "CFWS two-branch": {"cfws_deploy": "two_branch"},
           "min-max/channel + percentile": {**PLAIN, "weight": "minmax", "activation": "percentile"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    size, seconds = (64, 0.3) if args.quick else (224, args.seconds)
    torch.manual_seed(0)
    model = repq.create_model("repvgg_a0", num_classes=1000).eval()
    calib = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(0))
    tmp = Path(tempfile.mkdtemp(prefix="repq-cfws-224-"))
    paths = {"FP32": export_onnx(repq.reparameterize(model, calib[:2]), tmp / "fp32.onnx", calib[:1],
                                 allow_float=True)}
    for label, options in RECIPES.items():
        q = repq.quantize(model, calib, repq.PTQConfig(quantize_pool=True, **options))
        paths[label] = export_onnx(q, tmp / f"{label.replace(' ', '_').replace('/', '_')}.onnx", calib[:1])
    rows = {}
    for label, path in paths.items():
        kernels = kernel_counts(path)
        rows[label] = {"kernels": {k: kernels[k] for k in ("QLinearConv", "QLinearAdd", "ConvInteger")},
                       "images_per_s": {b: throughput(path, [3, size, size], b, seconds, threads=2) for b in (64, 1)}}
        print(label, rows[label], flush=True)
    cmd = "python benchmarks/cfws_deploy_224.py" + (" --quick" if args.quick else "")
    lines = [f"# CFWS deployments at {size}x{size}: RepVGG-A0 (full width, 1000 classes) in ONNX Runtime", "",
             f"Command: `{cmd}`", f"Machine: {machine()}; ONNX Runtime CPU provider, 2 threads; random inputs, "
             f"{seconds:g} s per measurement", "",
             "| model | kernels | images/s b=64 | images/s b=1 | b=64 vs FP32 | b=64 vs min-max |", "|---|" + "---|" * 5]
    mm = rows["min-max/channel + percentile"]["images_per_s"]
    for label, r in rows.items():
        k = ", ".join(f"{n} {v}" for n, v in r["kernels"].items() if v) or "float"
        s = r["images_per_s"]
        lines.append(f"| {label} | {k} | {s[64]:.1f} | {s[1]:.1f} | {s[64] / rows['FP32']['images_per_s'][64]:.2f}x | "
                     f"{s[64] / mm[64]:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("cfws_deploy_224", text, {"command": cmd, "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()

"""Deployment: repq QDQ models in ONNX Runtime (parity, integer kernels, speed, size) and ONNX Runtime's own
`quantize_static` (MinMax, Entropy, Percentile; QDQ, per-channel int8 weights, uint8 activations) on the same
32 calibration images.

    python benchmarks/export_benchmark.py           # the zoo's strong reference, fmnist_a0_strong (~25 min)
    python benchmarks/export_benchmark.py --quick   # tiny digits model (seconds)
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from common import METHOD_ONLY, kernel_counts, machine, repq, write_result
from repq.export import export_onnx, run_onnx, top1, verify_against_simulation
from repq.export.bench import layer_times, throughput
from repq.quant.modules import QUANT_LAYERS
from zoo import zoo, zoo_checkpoint

# repq rows: (label, PTQConfig options on top of uint8 activations and a quantized pool input). The first row keeps
# the pool input in float, the layout before `quantize_pool`: its last conv cannot be fused (ConvInteger). Rows that
# name a method run without what the default adds to it (common.METHOD_ONLY).
DEPLOY = {"unsigned_activations": True, "quantize_pool": True}
METHOD = {**DEPLOY, **METHOD_ONLY}
DEFAULT_EXACT = "default (equalization + CFWS + auto + bias correction), exact"
DEFAULT_TWO_BRANCH = "default (equalization + CFWS + auto + bias correction), two-branch"
RECIPES = [
    ("minmax/channel + percentile, pool not quantized",
     {**METHOD_ONLY, "weight": "minmax", "activation": "percentile", "unsigned_activations": True}),
    ("minmax/tensor + minmax", {**METHOD, "weight": "minmax", "weight_granularity": "tensor", "activation": "minmax"}),
    ("minmax/channel + percentile", {**METHOD, "weight": "minmax", "activation": "percentile"}),
    ("mse/channel + mse", {**METHOD, "weight": "mse", "activation": "mse"}),
    ("cfws/channel + percentile", {**METHOD, "weight": "cfws", "activation": "percentile"}),
    ("cfws_whole/channel + improved_kl (float pass)", {**METHOD, "weight": "cfws_whole", "activation": "improved_kl",
                                                       "sequential": False}),
    ("cfws/channel + improved_kl (float pass)", {**METHOD, "weight": "cfws", "activation": "improved_kl",
                                                 "sequential": False}),
    (DEFAULT_EXACT, DEPLOY),
    (DEFAULT_TWO_BRANCH, {**DEPLOY, "cfws_deploy": "two_branch"}),
]
# the rows whose layers are timed one by one (ONNX Runtime's profiler, batch 64)
TIMED = ("minmax/channel + percentile", DEFAULT_EXACT, DEFAULT_TWO_BRANCH)


def conv_kernels(path: Path) -> dict[str, int]:
    """Fused integer convs, unfused integer convs (ConvInteger + float epilogue) and float convs of ORT's
    optimized graph."""
    counts = kernel_counts(path)
    return {k: counts[k] for k in ("QLinearConv", "ConvInteger", "float_convs")}


def ort_quantize_static(fp_path: Path, out: Path, calib: np.ndarray, method: str) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(fp_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    model_name = "quick_a0" if args.quick else "fmnist_a0_strong"   # the zoo's strong reference
    spec = zoo(args.quick)[model_name]
    seconds = 0.5 if args.quick else 5.0
    model, _ = repq.load_checkpoint(zoo_checkpoint(model_name, quick=args.quick, progress=False))
    train_ds, test_ds = repq.load_dataset(spec["data"], "train"), repq.load_dataset(spec["data"], "test")
    images, labels = test_ds.normalize(test_ds.images).numpy(), test_ds.labels.numpy()
    calib = train_ds.calibration_images(32, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="repq-export-"))
    fused = repq.reparameterize(model)
    fp_path = export_onnx(fused, tmp / "fp32.onnx", calib[:1], allow_float=True)
    fp_top1 = top1(run_onnx(fp_path, images), labels)
    shape = list(images.shape[1:])
    speed = {"fp32": {b: throughput(fp_path, shape, b, seconds, threads=2) for b in (1, 64)}}
    timed: dict[str, dict[str, float]] = {}
    sizes = {"fp32": fp_path.stat().st_size}
    fp_float_convs = conv_kernels(fp_path)["float_convs"]
    rows = []
    for i, (label, options) in enumerate(RECIPES[-2:] if args.quick else RECIPES):
        q = repq.quantize(model, calib, repq.PTQConfig(**options))
        name = f"repq {label}"
        path = export_onnx(q, tmp / f"repq_{i}.onnx", calib[:1])
        check = verify_against_simulation(q, path, images, labels)
        rows.append({"name": name, "top1_sim": check["top1_repq"], "top1_ort": check["top1_onnxruntime"],
                     "max_logit_diff": check["max_logit_diff"], **conv_kernels(path), "bytes": path.stat().st_size})
        speed[name] = {b: throughput(path, shape, b, seconds, threads=2) for b in (1, 64)}
        if label in TIMED:
            timed[label] = layer_times(path, [n for n, m in q.named_modules() if isinstance(m, QUANT_LAYERS)], shape,
                                       64, runs=20, threads=2)
        print(rows[-1], speed[name], flush=True)
    peers = []
    for method in ("MinMax",) if args.quick else ("MinMax", "Entropy", "Percentile"):
        path = ort_quantize_static(fp_path, tmp / f"ort_{method}.onnx", calib.numpy(), method)
        peers.append({"name": f"ORT quantize_static {method}", "top1_ort": top1(run_onnx(path, images), labels),
                      **conv_kernels(path), "bytes": path.stat().st_size})
        speed[peers[-1]["name"]] = {b: throughput(path, shape, b, seconds, threads=2) for b in (1, 64)}
        print(peers[-1], flush=True)
    cmd = "python benchmarks/export_benchmark.py" + (" --quick" if args.quick else "")
    lines = [f"# Deployment in ONNX Runtime: {model_name} ({spec['model']} {spec['model_kwargs']}, {spec['data']})", "",
             f"Command: `{cmd}` (32 calibration images, seed 0; full test split; int8 weights, uint8 activations "
             "(unsigned_activations=True), global-pool input quantized (quantize_pool=True) unless the row says so)",
             f"Machine: {machine()}; ONNX Runtime CPU provider, 2 threads", "",
             f"FP32 ONNX top-1: **{fp_top1:.2f}**", "",
             "| model | top-1 repq sim | top-1 ONNX Runtime | max logit diff | QLinearConv | ConvInteger | "
             "float convs | MB | img/s b=1 | img/s b=64 | b=64 vs FP32 |", "|---|" + "---|" * 10,
             f"| FP32 | - | {fp_top1:.2f} | - | - | - | {fp_float_convs} | {sizes['fp32'] / 1e6:.2f} | "
             f"{speed['fp32'][1]:.0f} | {speed['fp32'][64]:.0f} | 1.00x |"]
    for r in rows + peers:
        sim = f"{r['top1_sim']:.2f}" if "top1_sim" in r else "-"
        diff = f"{r['max_logit_diff']:.3g}" if "max_logit_diff" in r else "-"
        b1, b64 = speed[r["name"]][1], speed[r["name"]][64]
        lines.append(f"| {r['name']} | {sim} | {r['top1_ort']:.2f} | {diff} | {r['QLinearConv']} | "
                     f"{r['ConvInteger']} | {r['float_convs']} | {r['bytes'] / 1e6:.2f} | {b1:.0f} | {b64:.0f} | "
                     f"{b64 / speed['fp32'][64]:.2f}x |")
    if timed:
        labels = list(timed)
        lines += ["", "## Time per layer (ms per batch of 64, ONNX Runtime's profiler, 20 runs)", "",
                  "A layer's time includes the QuantizeLinear of its input and, in the two-branch form, its "
                  "QLinearAdd.", "", "| layer | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for layer in timed[labels[0]]:
            lines.append(f"| {layer} | " + " | ".join(f"{timed[k].get(layer, 0.0):.3f}" for k in labels) + " |")
        lines.append("| **total** | " + " | ".join(f"**{sum(timed[k].values()):.2f}**" for k in labels) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("export", text, {"fp32_top1": fp_top1, "repq": rows, "ort_quantize_static": peers,
                                      "layer_ms_batch64": timed,
                                      "throughput": {k: {str(b): v for b, v in d.items()} for k, d in speed.items()},
                                      "machine": machine()})


if __name__ == "__main__":
    main()

"""ClusterQAT on the int8 grid: what snapping each layer's codebook to one int8 grid costs in accuracy against the
free codebook, and what it buys in ONNX Runtime (fused int8 convs instead of float convs on looked-up weights).

    python benchmarks/cluster_grid_benchmark.py           # OABN twin + strong reference, W4A8 / W4A4 / W3A3
    python benchmarks/cluster_grid_benchmark.py --quick   # tiny digits model, W4A4 (seconds), prints only

Each run: prepare_qat(method="cluster", codebook refit, first conv and last linear at 8 bits, quantize_pool: the
global-pool input quantized at 8 bits too, so the last conv can be fused), one epoch capped at
--max-steps steps (lr 0.01 after a linear warmup of 0.2 epoch, `repq qat`'s default: the first 30 of the 150
steps; no weight decay), convert, full test split in repq's simulation and in ONNX Runtime;
throughput in ONNX Runtime (2 threads, batch 64) against the fused FP32 model.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from common import PLAIN, kernel_counts, machine, repq, write_result
from repq.export import export_onnx, verify_against_simulation
from repq.export.bench import throughput
from zoo import select, zoo, zoo_checkpoint

WARMUP_EPOCHS = 0.2   # `repq qat`'s default; the page is written only with it


def run_model(name: str, quick: bool, pairs: list[tuple[int, int]], steps: int, seconds: float, tmp: Path,
              warmup: float = WARMUP_EPOCHS) -> dict:
    """FP32 and per-channel min-max PTQ (W8A8, the fused baseline) speeds, then the free and int8-grid ClusterQAT
    runs at each W/A pair."""
    spec = zoo(quick)[name]
    model, _ = repq.load_checkpoint(zoo_checkpoint(name, quick=quick, progress=False))
    train_ds, test_ds = repq.load_dataset(spec["data"], "train"), repq.load_dataset(spec["data"], "test")
    calib = train_ds.calibration_images(32, seed=0)
    shape = list(calib.shape[1:])
    fp_path = export_onnx(repq.reparameterize(model, calib[:2]), tmp / f"{name}_fp32.onnx", calib[:1],
                          allow_float=True)
    minmax = repq.quantize(model, calib, repq.PTQConfig(**PLAIN, weight="minmax", activation="percentile",
                                                        quantize_pool=True))
    mm_path = export_onnx(minmax, tmp / f"{name}_minmax.onnx", calib[:1])
    result = {"model": name, "fp_top1": repq.evaluate(model, test_ds)["top1"],
              "fp32_images_per_s": throughput(fp_path, shape, 64, seconds, threads=2),
              "minmax_images_per_s": throughput(mm_path, shape, 64, seconds, threads=2), "rows": []}
    print(name, {k: v for k, v in result.items() if k != "rows"}, flush=True)
    for w_bits, a_bits in pairs:
        for grid in ("free", "int8"):
            torch.manual_seed(0)
            qat = repq.prepare_qat(model, repq.QATConfig(method="cluster", w_bits=w_bits, a_bits=a_bits,
                                                         codebook_grid=grid, quantize_pool=True), calib)
            repq.train(qat, train_ds, repq.TrainConfig(epochs=1, lr=0.01, weight_decay=0.0, seed=0,
                                                       warmup_epochs=warmup, max_steps_per_epoch=steps),
                       progress=False)
            q = repq.convert_qat(qat)
            path = export_onnx(q, tmp / f"{name}_w{w_bits}a{a_bits}_{grid}.onnx", calib[:1])
            check = verify_against_simulation(q, path, test_ds)
            kernels = kernel_counts(path)
            result["rows"].append({"bits": f"W{w_bits}A{a_bits}", "codebook": grid, "top1_sim": check["top1_repq"],
                                   "top1_ort": check["top1_onnxruntime"], "agreement": check["argmax_agreement"],
                                   **{k: kernels[k] for k in ("QLinearConv", "ConvInteger", "float_convs")},
                                   "images_per_s": throughput(path, shape, 64, seconds, threads=2)})
            print(result["rows"][-1], flush=True)
    result["snap_cost"] = {}
    for bits in dict.fromkeys(r["bits"] for r in result["rows"]):
        free, snapped = (next(r for r in result["rows"] if r["bits"] == bits and r["codebook"] == grid)
                         for grid in ("free", "int8"))
        result["snap_cost"][bits] = snapped["top1_sim"] - free["top1_sim"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bits", default="4/8,4/4,3/3", help="W/A pairs")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--only", default="", help="comma-separated zoo entries (default: the OABN twin, P2's "
                        "pipeline, and the strong reference, whose FP32 speed is bound by arithmetic rather than by "
                        "ONNX Runtime's per-node cost)")
    parser.add_argument("--warmup-epochs", type=float, default=WARMUP_EPOCHS,
                        help="linear lr warmup of each QAT run (default 0.2, `repq qat`'s); any other value prints "
                             "its table without writing docs/results (0 reproduces the divergence in methods.md)")
    args = parser.parse_args()
    names = select(args.only, args.quick, ["quick_a0"] if args.quick else ["fmnist_a0_half_oabn", "fmnist_a0_strong"])
    specs = zoo(args.quick)
    pairs = [(4, 4)] if args.quick else [tuple(int(b) for b in p.split("/")) for p in args.bits.split(",")]
    steps = 20 if args.quick else args.max_steps
    seconds = 0.3 if args.quick else 3.0
    tmp = Path(tempfile.mkdtemp(prefix="repq-cluster-grid-"))
    results = [run_model(name, args.quick, pairs, steps, seconds, tmp, args.warmup_epochs) for name in names]
    cmd = " ".join(["python benchmarks/cluster_grid_benchmark.py", *sys.argv[1:]])
    lines = ["# ClusterQAT on the int8 grid", "",
             f"Command: `{cmd}` (ClusterQAT, codebook refit, edge layers and the pool input at 8 bits, {steps} steps, "
             f"lr 0.01 after a linear warmup of {args.warmup_epochs:g} epoch; full test split)",
             f"Machine: {machine()}; ONNX Runtime CPU provider, 2 threads, batch 64", "",
             "Activation codes narrower than 8 bits travel in uint8, clipped to their own range by an integer Clip "
             "after the QuantizeLinear, so every conv stays a fused QLinearConv at A4 and A3 too. The per-channel "
             "min-max W8A8 PTQ model of the same network is the fused baseline: a model this small can be bound by "
             "ONNX Runtime's per-node cost, and then no quantized form reaches a large speed-up.", ""]
    for r in results:
        spec = specs[r["model"]]
        fp = r["fp32_images_per_s"]
        lines += [f"## {r['model']} ({spec['model']} {spec['model_kwargs']}, {spec['data']})", "",
                  f"FP top-1 {r['fp_top1']:.2f}; ONNX Runtime FP32 {fp:.0f} images/s, per-channel min-max W8A8 "
                  f"{r['minmax_images_per_s']:.0f} images/s ({r['minmax_images_per_s'] / fp:.2f}x)", "",
                  "| bits | codebook | top-1 (sim) | top-1 ONNX Runtime | same prediction | QLinearConv | ConvInteger | "
                  "float convs | images/s | vs FP32 |", "|---|" + "---|" * 9]
        for row in r["rows"]:
            lines.append(f"| {row['bits']} | {row['codebook']} | {row['top1_sim']:.2f} | {row['top1_ort']:.2f} | "
                         f"{row['agreement']:.2f}% | {row['QLinearConv']} | {row['ConvInteger']} | "
                         f"{row['float_convs']} | {row['images_per_s']:.0f} | {row['images_per_s'] / fp:.2f}x |")
        lines += ["", "Cost of the snap (int8 - free, top-1): "
                  + ", ".join(f"{b} {c:+.2f}" for b, c in r["snap_cost"].items()), ""]
    text = "\n".join(lines)
    print(text)
    if not args.quick and args.warmup_epochs == WARMUP_EPOCHS:
        write_result("cluster_grid", text, {"command": cmd, "machine": machine(), "models": results})


if __name__ == "__main__":
    main()

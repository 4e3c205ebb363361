"""ClusterQAT on the int8 grid: what snapping each layer's codebook to one int8 grid costs in accuracy against the
free codebook, and what it buys in ONNX Runtime (fused int8 convs instead of float convs on looked-up weights);
with reduce_range too (a grid of max |centroid| / 63: codes exact in ONNX Runtime's fast kernels without VNNI).

    python benchmarks/cluster_grid_benchmark.py           # OABN twin + strong reference, W4A8 / W4A4 / W3A3
    python benchmarks/cluster_grid_benchmark.py --quick   # tiny digits model, W4A4 (seconds), prints only

Each run: prepare_qat(method="cluster", codebook refit, first conv and last linear at 8 bits, quantize_pool: the
global-pool input quantized at 8 bits too, so the last conv can be fused), one epoch capped at
--max-steps steps (lr 0.01 after a linear warmup of 0.2 epoch, `repq qat`'s default: the first 30 of the 150
steps; no weight decay), convert, full test split in repq's simulation and in ONNX Runtime;
throughput in ONNX Runtime (2 threads, batch 64, repq's exact session option) against the fused FP32 model and the
per-channel min-max W8A8 PTQ model (8- and 7-bit weights).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from common import PLAIN, cpu_line, interleaved_throughput, kernel_counts, machine, repq, write_result
from repq.export import export_onnx, verify_against_simulation
from repq.export.verify import largest_weight_code
from zoo import select, zoo, zoo_checkpoint

WARMUP_EPOCHS = 0.2   # `repq qat`'s default; the page is written only with it
# codebook label -> QATConfig fields: the free codebook, the int8 grid (codes up to +-127) and the int8 grid with
# reduce_range (codes within +-63, exact in ONNX Runtime's fast u8 x s8 kernels on CPUs without VNNI)
GRIDS = {"free": {"codebook_grid": "free"}, "int8": {"codebook_grid": "int8"},
         "int8, 7-bit": {"codebook_grid": "int8", "reduce_range": True}}


def run_model(name: str, quick: bool, pairs: list[tuple[int, int]], steps: int, seconds: float, tmp: Path,
              warmup: float = WARMUP_EPOCHS, repeats: int = 3) -> dict:
    """The free and int8-grid ClusterQAT runs at each W/A pair, then the speed of every exported model beside FP32
    and per-channel min-max PTQ (W8A8, the fused baseline; 8- and 7-bit weights), interleaved (median of
    `repeats`)."""
    spec = zoo(quick)[name]
    model, _ = repq.load_checkpoint(zoo_checkpoint(name, quick=quick, progress=False))
    train_ds, test_ds = repq.load_dataset(spec["data"], "train"), repq.load_dataset(spec["data"], "test")
    calib = train_ds.calibration_images(32, seed=0)
    shape = list(calib.shape[1:])
    fp_path = export_onnx(repq.reparameterize(model, calib[:2]), tmp / f"{name}_fp32.onnx", calib[:1],
                          allow_float=True)
    result = {"model": name, "fp_top1": repq.evaluate(model, test_ds)["top1"], "rows": []}
    paths = {"fp32_images_per_s": fp_path}
    for key, narrow in (("minmax_images_per_s", False), ("minmax_7bit_images_per_s", True)):
        minmax = repq.quantize(model, calib, repq.PTQConfig(**PLAIN, weight="minmax", activation="percentile",
                                                            quantize_pool=True, reduce_range=narrow))
        paths[key] = export_onnx(minmax, tmp / f"{name}_minmax_{narrow}.onnx", calib[:1])
    for w_bits, a_bits in pairs:
        for grid, fields in GRIDS.items():
            torch.manual_seed(0)
            qat = repq.prepare_qat(model, repq.QATConfig(method="cluster", w_bits=w_bits, a_bits=a_bits,
                                                         quantize_pool=True, **fields), calib)
            repq.train(qat, train_ds, repq.TrainConfig(epochs=1, lr=0.01, weight_decay=0.0, seed=0,
                                                       warmup_epochs=warmup, max_steps_per_epoch=steps),
                       progress=False)
            q = repq.convert_qat(qat)
            path = export_onnx(q, tmp / f"{name}_w{w_bits}a{a_bits}_{len(result['rows'])}.onnx", calib[:1])
            check = verify_against_simulation(q, path, test_ds)
            kernels = kernel_counts(path)
            result["rows"].append({"bits": f"W{w_bits}A{a_bits}", "codebook": grid, "top1_sim": check["top1_repq"],
                                   "top1_ort": check["top1_onnxruntime"], "agreement": check["argmax_agreement"],
                                   **{k: kernels[k] for k in ("QLinearConv", "ConvInteger", "float_convs")},
                                   "largest_code": largest_weight_code(path)})
            paths[f"row {len(result['rows']) - 1}"] = path
            print(result["rows"][-1], flush=True)
    speeds = interleaved_throughput(paths, shape, 64, seconds, repeats)
    for i, row in enumerate(result["rows"]):
        row["images_per_s"] = speeds[f"row {i}"]
    result.update({key: speeds[key] for key in ("fp32_images_per_s", "minmax_images_per_s",
                                                "minmax_7bit_images_per_s")}, repeats=repeats)
    print(name, {k: v for k, v in result.items() if k != "rows"}, flush=True)
    result["snap_cost"] = {}   # grid -> bits -> top-1 of the snapped codebook minus the free one
    for grid in [g for g in GRIDS if g != "free"]:
        for bits in dict.fromkeys(r["bits"] for r in result["rows"]):
            free, snapped = (next(r for r in result["rows"] if r["bits"] == bits and r["codebook"] == g)
                             for g in ("free", grid))
            result["snap_cost"].setdefault(grid, {})[bits] = snapped["top1_sim"] - free["top1_sim"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bits", default="4/8,4/4,3/3", help="W/A pairs")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved speed measurements per model (median)")
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
    repeats = 1 if args.quick else args.repeats
    results = [run_model(name, args.quick, pairs, steps, seconds, tmp, args.warmup_epochs, repeats) for name in names]
    cmd = " ".join(["python benchmarks/cluster_grid_benchmark.py", *sys.argv[1:]])
    lines = ["# ClusterQAT on the int8 grid", "",
             f"Command: `{cmd}` (ClusterQAT, codebook refit, edge layers and the pool input at 8 bits, {steps} steps, "
             f"lr 0.01 after a linear warmup of {args.warmup_epochs:g} epoch; full test split)",
             f"Machine: {machine()}; {cpu_line()}; ONNX Runtime CPU provider, 2 threads, batch 64, the median of "
             f"{repeats} interleaved {seconds:g}-s measurements per model, session option "
             "session.x64quantprecision=1 (repq's sessions: exact u8 x s8 products on CPUs without VNNI, where it "
             "runs the layers with weight codes beyond +-64 on slower u8 x u8 kernels)", "",
             "Codebooks: free (float centroids, deployed as float convs on looked-up weights); int8 (centroids on "
             "one per-layer grid of max |centroid| / 127); int8, 7-bit (`QATConfig(reduce_range=True)`: a grid of "
             "max |centroid| / 63 and 7-bit edge layers, codes within +-63, exact in the fast kernels). "
             "Largest code: the largest |int8 weight code| in the ONNX file.", "",
             "Activation codes narrower than 8 bits travel in uint8, clipped to their own range by an integer Clip "
             "after the QuantizeLinear, so every conv stays a fused QLinearConv at A4 and A3 too. The per-channel "
             "min-max W8A8 PTQ model of the same network is the fused baseline: a model this small can be bound by "
             "ONNX Runtime's per-node cost, and then no quantized form reaches a large speed-up.", ""]
    for r in results:
        spec = specs[r["model"]]
        fp = r["fp32_images_per_s"]
        lines += [f"## {r['model']} ({spec['model']} {spec['model_kwargs']}, {spec['data']})", "",
                  f"FP top-1 {r['fp_top1']:.2f}; ONNX Runtime FP32 {fp:.0f} images/s, per-channel min-max W8A8 "
                  f"{r['minmax_images_per_s']:.0f} images/s ({r['minmax_images_per_s'] / fp:.2f}x), with 7-bit "
                  f"weights {r['minmax_7bit_images_per_s']:.0f} images/s "
                  f"({r['minmax_7bit_images_per_s'] / fp:.2f}x)", "",
                  "| bits | codebook | top-1 (sim) | top-1 ONNX Runtime | same prediction | QLinearConv | ConvInteger | "
                  "float convs | largest code | images/s | vs FP32 |", "|---|" + "---|" * 10]
        for row in r["rows"]:
            lines.append(f"| {row['bits']} | {row['codebook']} | {row['top1_sim']:.2f} | {row['top1_ort']:.2f} | "
                         f"{row['agreement']:.2f}% | {row['QLinearConv']} | {row['ConvInteger']} | "
                         f"{row['float_convs']} | {row['largest_code'] or '-'} | {row['images_per_s']:.0f} | "
                         f"{row['images_per_s'] / fp:.2f}x |")
        lines += [""] + [f"Cost of the snap ({grid} - free, top-1): "
                         + ", ".join(f"{b} {c:+.2f}" for b, c in costs.items()) for grid, costs in r["snap_cost"].items()]
        lines += [""]
    text = "\n".join(lines)
    print(text)
    if not args.quick and args.warmup_epochs == WARMUP_EPOCHS:
        write_result("cluster_grid", text, {"command": cmd, "machine": machine(), "models": results})


if __name__ == "__main__":
    main()

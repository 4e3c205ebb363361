"""ClusterQAT on the int8 grid: what snapping each layer's codebook to one int8 grid costs in accuracy against the
free codebook, and what it buys in ONNX Runtime (fused int8 convs instead of float convs on looked-up weights).

    python benchmarks/cluster_grid_benchmark.py           # the zoo's OABN twin, W4A8 / W4A4 / W3A3 (~15 min)
    python benchmarks/cluster_grid_benchmark.py --quick   # tiny digits model, W4A4 (seconds), prints only

Each run: prepare_qat(method="cluster", codebook refit, first conv and last linear at 8 bits, quantize_pool: the
global-pool input quantized at 8 bits too, so the last conv can be fused), one epoch capped at
--max-steps steps (lr 0.01, no weight decay), convert, full test split in repq's simulation and in ONNX Runtime;
throughput in ONNX Runtime (2 threads, batch 64) against the fused FP32 model.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import kernel_counts, machine, repq, write_result
from repq.export import export_onnx, verify_against_simulation
from repq.export.bench import throughput
from zoo import zoo, zoo_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bits", default="4/8,4/4,3/3", help="W/A pairs")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--model", default="fmnist_a0_half_oabn", help="zoo entry (OABN-trained: P2's pipeline)")
    args = parser.parse_args()
    name = "quick_a0" if args.quick else args.model
    spec = zoo(args.quick)[name]
    model, _ = repq.load_checkpoint(zoo_checkpoint(name, quick=args.quick, progress=False))
    train_ds, test_ds = repq.load_dataset(spec["data"], "train"), repq.load_dataset(spec["data"], "test")
    calib = train_ds.calibration_images(32, seed=0)
    pairs = [(4, 4)] if args.quick else [tuple(int(b) for b in p.split("/")) for p in args.bits.split(",")]
    steps = 20 if args.quick else args.max_steps
    seconds = 0.3 if args.quick else 3.0
    tmp = Path(tempfile.mkdtemp(prefix="repq-cluster-grid-"))
    fp_top1 = repq.evaluate(model, test_ds)["top1"]
    fp_path = export_onnx(repq.reparameterize(model, calib[:2]), tmp / "fp32.onnx", calib[:1], allow_float=True)
    fp_speed = throughput(fp_path, list(calib.shape[1:]), 64, seconds, threads=2)
    rows = []
    for w_bits, a_bits in pairs:
        for grid in ("free", "int8"):
            torch.manual_seed(0)
            qat = repq.prepare_qat(model, repq.QATConfig(method="cluster", w_bits=w_bits, a_bits=a_bits,
                                                         codebook_grid=grid, quantize_pool=True), calib)
            repq.train(qat, train_ds, repq.TrainConfig(epochs=1, lr=0.01, weight_decay=0.0, seed=0,
                                                       max_steps_per_epoch=steps), progress=False)
            q = repq.convert_qat(qat)
            path = export_onnx(q, tmp / f"w{w_bits}a{a_bits}_{grid}.onnx", calib[:1])
            check = verify_against_simulation(q, path, test_ds)
            kernels = kernel_counts(path)
            rows.append({"bits": f"W{w_bits}A{a_bits}", "codebook": grid, "top1_sim": check["top1_repq"],
                         "top1_ort": check["top1_onnxruntime"], "agreement": check["argmax_agreement"],
                         **{k: kernels[k] for k in ("QLinearConv", "ConvInteger", "float_convs")},
                         "images_per_s": throughput(path, list(calib.shape[1:]), 64, seconds, threads=2)})
            print(rows[-1], flush=True)
    cmd = "python benchmarks/cluster_grid_benchmark.py" + (" --quick" if args.quick else "")
    lines = [f"# ClusterQAT on the int8 grid: {name} ({spec['model']} {spec['model_kwargs']}, {spec['data']})", "",
             f"Command: `{cmd}` (ClusterQAT, codebook refit, edge layers and the pool input at 8 bits, {steps} steps, "
             "lr 0.01; full test split)", f"Machine: {machine()}; ONNX Runtime CPU provider, 2 threads, batch 64", "",
             f"FP top-1 {fp_top1:.2f}; FP32 in ONNX Runtime {fp_speed:.0f} images/s", "",
             "| bits | codebook | top-1 (sim) | top-1 ONNX Runtime | same prediction | QLinearConv | ConvInteger | "
             "float convs | images/s | vs FP32 |", "|---|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['codebook']} | {r['top1_sim']:.2f} | {r['top1_ort']:.2f} | "
                     f"{r['agreement']:.2f}% | {r['QLinearConv']} | {r['ConvInteger']} | {r['float_convs']} | "
                     f"{r['images_per_s']:.0f} | "
                     f"{r['images_per_s'] / fp_speed:.2f}x |")
    cost = {r["bits"]: None for r in rows}
    for bits in cost:
        free = next(r for r in rows if r["bits"] == bits and r["codebook"] == "free")
        snapped = next(r for r in rows if r["bits"] == bits and r["codebook"] == "int8")
        cost[bits] = snapped["top1_sim"] - free["top1_sim"]
    lines += ["", "Cost of the snap (int8 - free, top-1): " + ", ".join(f"{b} {c:+.2f}" for b, c in cost.items()),
              "", "Below 8-bit activations no conv is fused (ConvInteger): the codes travel in uint8 behind a Clip to "
              "their own range, and ONNX Runtime fuses a conv only when a QuantizeLinear follows it directly.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        write_result("cluster_grid", text, {"command": cmd, "machine": machine(), "fp_top1": fp_top1,
                                            "fp32_images_per_s": fp_speed, "rows": rows, "snap_cost": cost})


if __name__ == "__main__":
    main()

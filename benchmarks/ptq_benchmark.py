"""PTQ on the reference model: every weight x activation recipe at W8A8, W6A6 and W4A8 rows, 3 calibration seeds.

    python benchmarks/ptq_benchmark.py            # reference Fashion-MNIST RepVGG-A0, ~20 min on 2 cores
    python benchmarks/ptq_benchmark.py --quick    # tiny digits model, one seed, a few recipes (seconds)
"""
from __future__ import annotations

import argparse
import statistics
import time

from common import QUICK_REFERENCE, REFERENCE, machine, reference_checkpoint, repq, write_result

ACTS = ["minmax", "percentile", "mse", "kl", "improved_kl"]
W8_WEIGHTS = [("minmax", "tensor"), ("minmax", "channel"), ("mse", "tensor"), ("mse", "channel"),
              ("cfws", "tensor"), ("cfws", "channel"), ("cfws_whole", "channel")]
LOW_BIT = [(w, "channel", a, wb, ab, seq) for wb, ab in ((6, 6), (4, 8)) for w in ("minmax", "mse", "cfws")
           for a, seq in (("percentile", True), ("improved_kl", True), ("improved_kl", False))]
# Calibration on the float network (one pass) instead of sequentially on the quantized prefix.
FLOAT_PASS = [("cfws", "channel", a, 8, 8, False) for a in ACTS]


def recipes(quick: bool) -> list[tuple[str, str, str, int, int, bool]]:
    if quick:
        return [("minmax", "tensor", "minmax", 8, 8, True), ("cfws", "channel", "improved_kl", 8, 8, True),
                ("cfws", "channel", "improved_kl", 4, 8, True)]
    return [(w, g, a, 8, 8, True) for w, g in W8_WEIGHTS for a in ACTS] + FLOAT_PASS + LOW_BIT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3, help="calibration seeds (0..N-1)")
    args = parser.parse_args()
    spec = QUICK_REFERENCE if args.quick else REFERENCE
    seeds = [0] if args.quick else list(range(args.seeds))
    model, _ = repq.load_checkpoint(reference_checkpoint(quick=args.quick))
    train_ds, test_ds = repq.load_dataset(spec["data"], "train"), repq.load_dataset(spec["data"], "test")
    fp = repq.evaluate(repq.reparameterize(model), test_ds)["top1"]
    rows = []
    for w, g, a, wb, ab, sequential in recipes(args.quick):
        accs, times = [], []
        for seed in seeds:
            calib = train_ds.calibration_images(32, seed)
            start = time.perf_counter()
            q = repq.quantize(model, calib, repq.PTQConfig(weight=w, weight_granularity=g, activation=a, w_bits=wb,
                                                           a_bits=ab, num_samples=32, seed=seed,
                                                           sequential=sequential))
            times.append(time.perf_counter() - start)
            accs.append(repq.evaluate(q, test_ds)["top1"])
        mean = statistics.mean(accs)
        spread = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        calibration = "sequential" if sequential else "float pass"
        rows.append({"weight": w, "granularity": g, "activation": a, "calibration": calibration,
                     "bits": f"W{wb}A{ab}", "top1_mean": mean,
                     "top1_std": spread, "top1_per_seed": accs, "drop": fp - mean, "ptq_seconds": max(times)})
        print(f"{rows[-1]['bits']} {w:10s} {g:7s} {a:12s} {calibration:10s} {mean:6.2f} ± {spread:.2f}  "
              f"drop {fp - mean:5.2f}  "
              f"{max(times):.1f} s", flush=True)
    cmd = "python benchmarks/ptq_benchmark.py" + (" --quick" if args.quick else "")
    lines = [f"# PTQ on {spec['model']} {spec['model_kwargs']} ({spec['data']})", "",
             f"Command: `{cmd}` (calibration seeds {seeds}, 32 images from the train split; full test split)",
             f"Machine: {machine()}", f"Float (fused) top-1: **{fp:.2f}**", "",
             "| bits | weight | granularity | activation | calibration | top-1 mean | ± std | drop vs FP | "
             "PTQ s (max) |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['weight']} | {r['granularity']} | {r['activation']} | {r['calibration']} | "
              f"{r['top1_mean']:.2f} | "
              f"{r['top1_std']:.2f} | {r['drop']:+.2f} | {r['ptq_seconds']:.1f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("ptq", text, {"fp_top1": fp, "rows": rows, "seeds": seeds, "machine": machine(),
                                   "spec": spec})


if __name__ == "__main__":
    main()

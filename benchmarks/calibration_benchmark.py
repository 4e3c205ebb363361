"""Why the former improved KL collapsed: per-layer activation thresholds (as % of each layer's float max) and top-1
for the former repq variant, each of its differences from P1 switched on its own, P1's faithful form (float
inputs and sequential), percentile and `auto`, on zoo models (W8A8, CFWS weights, 32 images, seed 0).

    python benchmarks/calibration_benchmark.py                  # fmnist_b1g4_quarter and fmnist_a1_half
    python benchmarks/calibration_benchmark.py --only NAME,...  # other zoo entries
    python benchmarks/calibration_benchmark.py --quick          # the tiny digits zoo (seconds)
"""
from __future__ import annotations

import argparse

from common import machine, repq, write_result
from repq.ptq import input_ranges
from zoo import select, zoo, zoo_checkpoint

FORMER = {"activation": "improved_kl", "kl_normalization": "separate", "kl_min_per_bin": 8.0,
          "bias_correction": False}
VARIANTS: dict[str, dict] = {
    "former (separate norm, 256-2048 bins, sequential)": {**FORMER, "sequential": True},
    "former, float inputs": FORMER,
    "former, float inputs, 2048 bins": {**FORMER, "kl_min_per_bin": 0.0},
    "P1 norm, float inputs, 256-2048 bins": {**FORMER, "kl_normalization": "p1"},
    "P1 (faithful), float inputs": {"activation": "improved_kl", "bias_correction": False},
    "P1 (faithful), sequential": {"activation": "improved_kl", "sequential": True, "bias_correction": False},
    "percentile 99.99": {"activation": "percentile", "bias_correction": False},
    "auto, no bias correction": {"bias_correction": False},
}
SHORT = ["former", "former float", "former 2048", "P1 norm 256+", "P1", "P1 seq", "p99.99", "auto"]
# (thresholds do not depend on bias correction, which runs after calibration; every column is without it)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated zoo entries")
    args = parser.parse_args()
    entries = zoo(args.quick)
    names = select(args.only, args.quick, ["quick_a0"] if args.quick else ["fmnist_b1g4_quarter", "fmnist_a1_half"])
    cmd = "python benchmarks/calibration_benchmark.py" + (" --quick" if args.quick else "") + (
        f" --only {args.only}" if args.only else "")
    lines = ["# Activation calibration: where the former improved KL went wrong", "",
             f"Command: `{cmd}` (W8A8, CFWS weights, 32 calibration images, seed 0; full test split)",
             f"Machine: {machine()}", "", "Columns: " + "; ".join(f"**{s}** = {v}" for s, v in zip(SHORT, VARIANTS)),
             ""]
    data = {}
    for name in names:
        spec = entries[name]
        model, _ = repq.load_checkpoint(zoo_checkpoint(name, quick=args.quick))
        train_ds, test_ds = repq.load_dataset(spec["data"], "train"), repq.load_dataset(spec["data"], "test")
        calib = train_ds.calibration_images(32, 0)
        fp = repq.evaluate(repq.reparameterize(model), test_ds)["top1"]
        float_max = input_ranges(repq.quantize(model, calib, repq.PTQConfig(activation="minmax")).repq_quant)
        results = {}
        for label, options in VARIANTS.items():
            q = repq.quantize(model, calib, repq.PTQConfig(**options))
            chosen = {n: s["calibrator"] for n, s in q.repq_quant["layers"].items()}
            results[label] = {"top1": repq.evaluate(q, test_ds)["top1"], "amax": input_ranges(q.repq_quant),
                              "calibrator": chosen}
            print(f"{name} {label}: {results[label]['top1']:.2f}", flush=True)
        data[name] = {"fp": fp, "float_max": float_max, "variants": results}
        lines += [f"## {name} (FP {fp:.2f})", "",
                  "| | " + " | ".join(SHORT) + " |", "|---" * (len(SHORT) + 1) + "|",
                  "| **top-1** | " + " | ".join(f"**{results[v]['top1']:.2f}**" for v in VARIANTS) + " |",
                  "", "Threshold per layer, % of the layer's float max (auto: the calibrator it chose):", "",
                  "| layer | float max | " + " | ".join(SHORT) + " |", "|---" * (len(SHORT) + 2) + "|"]
        for layer, top in float_max.items():
            cells = []
            for v in VARIANTS:
                pct = 100.0 * results[v]["amax"][layer] / top if top > 0 else 0.0
                cell = f"{pct:.0f}"
                if v == "auto, no bias correction":
                    cell += f" {results[v]['calibrator'][layer]}"
                cells.append(cell)
            lines.append(f"| {layer} | {top:.3g} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("calibration", text, {"models": data, "machine": machine()})


if __name__ == "__main__":
    main()

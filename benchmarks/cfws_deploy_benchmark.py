"""CFWS at INT8 speed: the exact CFWS deployment (one int32 sum, ConvInteger + float epilogue in ONNX Runtime)
against the two-branch one (each conv requantized to int8, integer add: QLinearConv + QLinearAdd), per zoo model:
accuracy of both in repq's simulation, ONNX Runtime parity of the two-branch model, the kernels ONNX Runtime
runs, and throughput against FP32 and the per-channel min-max model.

    python benchmarks/cfws_deploy_benchmark.py           # the zoo (~15 min on 2 cores), writes docs/results/cfws_deploy.*
    python benchmarks/cfws_deploy_benchmark.py --quick   # tiny zoo, prints only
    python benchmarks/cfws_deploy_benchmark.py --only M  # re-measure zoo entry M, keep the other rows
    python benchmarks/cfws_deploy_benchmark.py --seed-sweep 1,2   # accuracy (simulation) at more calibration
                                                                    # seeds, beside seed 0's rows (~20 min)

Every model: repq's default recipe (equalization + CFWS + auto + bias correction), 32 calibration images (seed 0), unsigned
activations and a quantized global-pool input (quantize_pool=True: the form ONNX Runtime fuses end to end).
Throughput: ONNX Runtime CPU provider, 2 threads, random inputs of the model's shape, batch 64 and 1.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import PLAIN, RESULTS, kernel_counts, machine, repq, write_result
from repq.export import export_onnx, verify_against_simulation
from repq.export.bench import throughput
from zoo import select, zoo, zoo_checkpoint

RECIPES = {"cfws exact": {"cfws_deploy": "exact"}, "cfws two-branch": {"cfws_deploy": "two_branch"},
           "minmax/channel + percentile": {**PLAIN, "weight": "minmax", "activation": "percentile"}}
# ablation, simulated only: every CFWS layer as two branches (no per-layer fallback to one min-max conv)
EVERY_LAYER = {"cfws_deploy": "two_branch", "one_conv_fallback": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma list of zoo entries (default: all)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per throughput measurement")
    parser.add_argument("--render-only", action="store_true", help="rewrite cfws_deploy.md from cfws_deploy.json")
    parser.add_argument("--seed-sweep", default="", metavar="SEEDS",
                        help="only measure the accuracy (simulation) of exact, two-branch and min-max at these extra "
                             "calibration seeds for the saved rows' models, and add them to the page")
    args = parser.parse_args()
    if args.render_only or args.seed_sweep:
        saved = json.loads((RESULTS / "cfws_deploy.json").read_text())
        if args.seed_sweep:
            seed_sweep(saved, args.seed_sweep)
        write_result("cfws_deploy", render(saved["rows"], saved["command"], saved["machine"],
                                           saved.get("seed_sweep")), saved)
        return
    seconds = 0.3 if args.quick else args.seconds
    names = select(args.only, args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="repq-cfws-deploy-"))
    rows = []
    for name in names:
        model, _ = repq.load_checkpoint(zoo_checkpoint(name, quick=args.quick, progress=False))
        data = zoo(args.quick)[name]["data"]
        train_ds, test_ds = repq.load_dataset(data, "train"), repq.load_dataset(data, "test")
        calib = train_ds.calibration_images(32, seed=0)
        example = calib[:1]
        fp_path = export_onnx(repq.reparameterize(model, calib[:2]), tmp / f"{name}_fp32.onnx", example,
                              allow_float=True)
        shape = list(example.shape[1:])
        row = {"model": name, "fp32": repq.evaluate(model, test_ds)["top1"], "speed": {}, "sim": {}}
        row["speed"]["fp32"] = {b: throughput(fp_path, shape, b, seconds, threads=2) for b in (64, 1)}
        for label, options in RECIPES.items():
            q = repq.quantize(model, calib, repq.PTQConfig(quantize_pool=True, **options))
            path = export_onnx(q, tmp / f"{name}_{label.replace(' ', '_').replace('/', '_')}.onnx", example)
            row["sim"][label] = repq.evaluate(q, test_ds)["top1"]
            row["speed"][label] = {b: throughput(path, shape, b, seconds, threads=2) for b in (64, 1)}
            if label == "cfws two-branch":
                row["verify"] = verify_against_simulation(q, path, test_ds)
                row["kernels"] = kernel_counts(path)
                row["check"] = q.repq_quant.get("two_branch_check")
        q = repq.quantize(model, calib, repq.PTQConfig(quantize_pool=True, **EVERY_LAYER))
        row["sim"]["two-branch every layer"] = repq.evaluate(q, test_ds)["top1"]
        print(row, flush=True)
        rows.append(row)

    cmd = "python benchmarks/cfws_deploy_benchmark.py" + (" --quick" if args.quick else "")
    if args.only and not args.quick:   # re-measured models replace their rows; the others are kept
        saved = RESULTS / "cfws_deploy.json"
        fresh = {r["model"]: r for r in rows}
        kept = json.loads(saved.read_text())["rows"] if saved.exists() else []
        rows = [fresh.pop(r["model"], r) for r in kept] + list(fresh.values())
    text = render(rows, cmd, machine())
    print(text)
    if not args.quick:   # a fresh seed-0 run drops an earlier seed sweep: its seeds were measured on other rows
        write_result("cfws_deploy", text, {"command": cmd, "machine": machine(), "rows": rows})


def seed_sweep(saved: dict, seeds_arg: str) -> None:
    """Add to the saved results the simulated top-1 of RECIPES at more calibration seeds, for the saved models."""
    seeds = [int(s) for s in seeds_arg.split(",")]
    sweep = saved.setdefault("seed_sweep", {"seeds": [], "top1": {}})
    for row in saved["rows"]:
        name = row["model"]
        model, _ = repq.load_checkpoint(zoo_checkpoint(name, progress=False))
        data = zoo(False)[name]["data"]
        train_ds, test_ds = repq.load_dataset(data, "train"), repq.load_dataset(data, "test")
        for seed in seeds:
            calib = train_ds.calibration_images(32, seed=seed)
            sweep["top1"].setdefault(name, {})[str(seed)] = {
                label: repq.evaluate(repq.quantize(model, calib, repq.PTQConfig(quantize_pool=True, seed=seed,
                                                                                **options)), test_ds)["top1"]
                for label, options in RECIPES.items()}
            print(name, seed, sweep["top1"][name][str(seed)], flush=True)
    sweep["seeds"] = sorted(set(sweep["seeds"]) | set(seeds))
    sweep["command"] = f"python benchmarks/cfws_deploy_benchmark.py --seed-sweep {seeds_arg}"
    sweep["machine"] = machine()


def _check(check: dict | None) -> str:
    """The two-branch check of repq.quantize (rows measured before it existed have none)."""
    if not check:
        return "-"
    ratio = check["error"] / check["baseline_error"] if check["baseline_error"] > 0 else float("inf")
    return f"{ratio:.2f}x ({'yes' if check['worse_than_baseline'] else 'no'})"


def _one_conv(check: dict | None) -> str:
    """CFWS layers deployed as one min-max conv / all CFWS layers (rows measured before the fallback: -)."""
    if not check or "one_conv_layers" not in check:
        return "-"
    kept = len(check["one_conv_layers"])
    return f"{kept} / {kept + check['two_branch_layers']}"


def _sim(row: dict, label: str) -> str:
    return f"{row['sim'][label]:.2f}" if label in row["sim"] else "-"


def render_seed_sweep(rows: list[dict], sweep: dict) -> list[str]:
    """Two-branch vs exact (and vs min-max) per model over seed 0 (the rows above) and the sweep's seeds."""
    seeds = [0, *sweep["seeds"]]
    lines = ["", f"## Accuracy over calibration seeds {', '.join(map(str, seeds))} (simulation)", "",
             f"Seed 0 is the table above; the others: `{sweep['command']}` ({sweep['machine']}). Same recipes, each "
             "seed's 32 calibration images.", "",
             "| model | CFWS exact, mean | CFWS two-branch, mean | two-branch - exact: mean / worst seed | "
             "two-branch - min-max/channel: mean / worst seed |", "|---|---|---|---|---|"]
    gaps, overs = [], []
    for r in rows:
        per_seed = {0: r["sim"], **{int(s): v for s, v in sweep["top1"].get(r["model"], {}).items()}}
        if not all(s in per_seed for s in seeds):
            continue
        exact = [per_seed[s]["cfws exact"] for s in seeds]
        two = [per_seed[s]["cfws two-branch"] for s in seeds]
        base = [per_seed[s]["minmax/channel + percentile"] for s in seeds]
        gap, over = [t - e for t, e in zip(two, exact)], [t - b for t, b in zip(two, base)]
        gaps.append(sum(gap) / len(gap))
        overs.append(sum(over) / len(over))
        lines.append(f"| {r['model']} | {sum(exact) / len(exact):.2f} | {sum(two) / len(two):.2f} | "
                     f"{gaps[-1]:+.2f} / {min(gap):+.2f} | {overs[-1]:+.2f} / {min(over):+.2f} |")
    if gaps:
        lines += ["", f"Over the seeds: two-branch - exact, per-model mean: zoo mean {sum(gaps) / len(gaps):+.3f}, "
                  f"worst model {min(gaps):+.2f} pt; two-branch - min-max/channel, per-model mean: worst model "
                  f"{min(overs):+.2f} pt"]
    return lines


def render(rows: list[dict], cmd: str, machine_line: str, sweep: dict | None = None) -> str:
    """The markdown page (also from a saved cfws_deploy.json: --render-only)."""
    def speed(row, label, batch):
        table = row["speed"][label]
        return table[batch] if batch in table else table[str(batch)]

    def ratio(row, label, ref, batch):
        return speed(row, label, batch) / speed(row, ref, batch)

    lines = ["# CFWS at INT8 speed: exact vs two-branch deployment", "",
             f"Command: `{cmd}`", f"Machine: {machine_line}; ONNX Runtime CPU provider, 2 threads", "",
             "Recipe: repq's default (equalization + CFWS + auto + bias correction), 32 calibration images (seed 0), quantize_pool; "
             "exact = one int32 sum of the fine 3x3 and coarse 1x1 convs (ConvInteger + float rescale in ONNX "
             "Runtime); two-branch = each conv requantized to int8, then an integer add (QLinearConv + "
             "QLinearAdd), except the CFWS layers whose output (after their activation) one per-channel min-max "
             "conv reconstructs better on the calibration images, deployed as that one conv (`one_conv_fallback`, "
             "the default); two-branch every layer = the ablation without that fallback. Full test splits.", "",
             "## Accuracy (top-1) and parity", "",
             "| model | FP | CFWS exact (sim) | CFWS two-branch (sim) | two-branch - exact | two-branch in ORT | "
             "ORT - sim | same prediction | min-max/channel + percentile (sim) | two-branch every layer (sim) | "
             "CFWS layers as one conv | kernels of the two-branch model | "
             "quantize's check: output error two-branch / min-max (warned) |",
             "|---|" + "---|" * 12]
    for r in rows:
        v, k = r["verify"], r["kernels"]
        lines.append(f"| {r['model']} | {r['fp32']:.2f} | {r['sim']['cfws exact']:.2f} | "
                     f"{r['sim']['cfws two-branch']:.2f} | {r['sim']['cfws two-branch'] - r['sim']['cfws exact']:+.2f} | "
                     f"{v['top1_onnxruntime']:.2f} | {v['top1_onnxruntime'] - v['top1_repq']:+.2f} | "
                     f"{v['argmax_agreement']:.2f}% | {r['sim']['minmax/channel + percentile']:.2f} | "
                     f"{_sim(r, 'two-branch every layer')} | {_one_conv(r.get('check'))} | "
                     f"{k['QLinearConv']} QLinearConv, {k['QLinearAdd']} QLinearAdd, {k['ConvInteger']} ConvInteger, "
                     f"{k['float_convs']} float conv | {_check(r.get('check'))} |")
    diffs = [r["sim"]["cfws two-branch"] - r["sim"]["cfws exact"] for r in rows]
    parity = [abs(r["verify"]["top1_onnxruntime"] - r["verify"]["top1_repq"]) for r in rows]
    over = [r["sim"]["cfws two-branch"] - r["sim"]["minmax/channel + percentile"] for r in rows]
    lines += ["", f"two-branch - exact: mean {sum(diffs) / len(diffs):+.3f}, worst {min(diffs):+.2f} pt; "
              f"ORT vs simulation: worst |difference| {max(parity):.2f} pt; two-branch - min-max/channel: worst "
              f"{min(over):+.2f} pt"]
    if sweep:
        lines += render_seed_sweep(rows, sweep)
    lines += ["", "## Throughput (images/s in ONNX Runtime)", "",
              "Models that run above ~10k images/s in FP32 (8x8 digits, quarter width, depthwise MobileOne) are "
              "bound by ONNX Runtime's per-node cost rather than arithmetic: there every quantized form, with its "
              "extra nodes, can be slower than FP32.", "",
              "| model | batch | FP32 | CFWS exact | CFWS two-branch | min-max/channel | two-branch vs FP32 | "
              "two-branch vs min-max | exact vs FP32 |", "|---|" + "---|" * 8]
    for r in rows:
        for b in (64, 1):
            lines.append(f"| {r['model']} | {b} | {speed(r, 'fp32', b):.0f} | {speed(r, 'cfws exact', b):.0f} | "
                         f"{speed(r, 'cfws two-branch', b):.0f} | {speed(r, 'minmax/channel + percentile', b):.0f} | "
                         f"{ratio(r, 'cfws two-branch', 'fp32', b):.2f}x | "
                         f"{ratio(r, 'cfws two-branch', 'minmax/channel + percentile', b):.2f}x | "
                         f"{ratio(r, 'cfws exact', 'fp32', b):.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Training-time methods on the reference model: plain BN vs OABN-trained RepVGG-A0 (same recipe and seed), each
quantized by PTQ (W8A8, W4A4) and by LSQ and ClusterQAT (W6A6, W4A4, W3A3), with training time.

    python benchmarks/qat_benchmark.py            # Fashion-MNIST A0, about an hour on 2 cores; the OABN twins are
                                                  # trained once and every row is cached in runs/
    python benchmarks/qat_benchmark.py --quick    # tiny digits models, plain and relative OABN, W4A4 (a minute)
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from common import CACHE, METHOD_ONLY, OABN_VARIANTS, machine, reference_checkpoint, reference_spec, repq, write_result

from repq.io import atomic_write_text

# (weight, granularity, activation, sequential calibration); per-tensor min-max shows whether the fused kernels still
# carry the identity outliers that make one scale per layer fail
PTQ_RECIPES = [("minmax", "tensor", "minmax", True), ("minmax", "channel", "minmax", True),
               ("cfws", "channel", "improved_kl", False)]
TARGETS = {4: 1.0, 3: 2.5}  # issue: OABN + ClusterQAT within this many points of FP
# --methods names: QATConfig options and table labels (cluster_channel: one codebook of weights divided by their
# output channel's max |w|, QATConfig.codebook_scale="channel")
METHODS = {"lsq": ({"method": "lsq"}, "LSQ"), "cluster": ({"method": "cluster"}, "ClusterQAT"),
           "cluster_channel": ({"method": "cluster", "codebook_scale": "channel"}, "ClusterQAT per-channel codebook")}


def _run_key(bits: int, method: str, budget: dict) -> str:
    return json.dumps({"bits": bits, "method": method, **budget}, sort_keys=True)


def _ptq_key(row: dict) -> tuple:
    return row["bits"], row["weight"], row.get("granularity", "channel"), row["activation"]


def _load_cache(path, spec: dict) -> dict:
    """A variant's cached FP/PTQ row and QAT runs, or {} when the reference it was computed on changed."""
    if not path.exists():
        return {}
    cached = json.loads(path.read_text())
    if "settings" in cached:  # the earlier layout: one QAT budget per variant, stored with its settings
        settings = cached.pop("settings")
        budget = {k: settings[k] for k in ("epochs", "lr", "max_steps")}
        cached = {**cached, "spec": settings["spec"],
                  "runs": {_run_key(q["bits"], q["method"], budget): q for q in cached.pop("qat")}}
    return cached if cached.get("spec") == spec else {}


def run_variant(oabn: str | None, args: argparse.Namespace) -> dict:
    """One reference model's row. The FP/PTQ part and every QAT run are cached in runs/ as soon as they finish
    (the whole benchmark takes hours on 2 cores), so an interrupted benchmark resumes."""
    spec = reference_spec(args.quick, oabn)
    budget = {"epochs": args.epochs, "lr": args.lr, "max_steps": args.max_steps}
    cache = CACHE / f"qat_{'quick_' if args.quick else ''}{oabn or 'plain'}.json"
    row = _load_cache(cache, spec)
    if args.from_cache and not row:
        raise SystemExit(f"no cached row for {oabn or 'plain'} in {CACHE}; run without --from-cache first")
    row = row or {"variant": f"OABN {oabn}" if oabn else "plain BN", "oabn": OABN_VARIANTS.get(oabn), "spec": spec,
                  "ptq": [], "runs": {}}
    needed = [(b, m) for b in args.bits for m in args.methods if _run_key(b, m, budget) not in row["runs"]]
    done = {_ptq_key(p) for p in row["ptq"]}
    missing_ptq = [(bits, *r) for bits in (8, 4) for r in PTQ_RECIPES if (bits, *r[:3]) not in done]
    if "fp" not in row or ((needed or missing_ptq) and not args.from_cache):
        model, payload = repq.load_checkpoint(reference_checkpoint(quick=args.quick, oabn=oabn))
        row["train_seconds"] = payload.get("history", {}).get("seconds")
        train_ds, test_ds = repq.load_dataset(spec["data"], "train"), repq.load_dataset(spec["data"], "test")
        calib = train_ds.calibration_images(32, 0)
    if "fp" not in row:
        row["fp"] = repq.evaluate(repq.reparameterize(model), test_ds)["top1"]
        print(f"{row['variant']}: FP (fused) {row['fp']:.2f}", flush=True)
    for bits, weight, granularity, activation, sequential in missing_ptq if not args.from_cache else []:
        config = repq.PTQConfig(**METHOD_ONLY, weight=weight, weight_granularity=granularity, activation=activation,
                                w_bits=bits, a_bits=bits, sequential=sequential, seed=0)
        top1 = repq.evaluate(repq.quantize(model, calib, config), test_ds)["top1"]
        row["ptq"].append({"bits": bits, "weight": weight, "granularity": granularity, "activation": activation,
                           "calibration": "sequential" if sequential else "float pass", "top1": top1})
        atomic_write_text(cache, json.dumps(row))
        print(f"  PTQ W{bits}A{bits} {weight}/{granularity}/{activation}: {top1:.2f}", flush=True)
    for bits, method in needed if not args.from_cache else []:
        config = repq.QATConfig(**METHODS[method][0], w_bits=bits, a_bits=bits, seed=0)
        qat = repq.prepare_qat(model, config, calib)
        start = repq.evaluate(qat, test_ds)["top1"]
        train_config = repq.TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr, weight_decay=0.0,
                                        seed=0, max_steps_per_epoch=args.max_steps)
        began = time.perf_counter()
        hist = repq.train(qat, train_ds, train_config, progress=False)
        seconds = time.perf_counter() - began
        top1 = repq.evaluate(repq.convert_qat(qat), test_ds)["top1"]
        row["runs"][_run_key(bits, method, budget)] = {
            "bits": bits, "method": method, "start": start, "top1": top1, "seconds": seconds,
            "steps": len(hist["loss"]), "images_per_s": hist["epochs"][-1]["images_per_s"]}
        atomic_write_text(cache, json.dumps(row))
        print(f"  {method:7s} W{bits}A{bits}: start {start:.2f} -> {top1:.2f} ({seconds / 60:.1f} min)", flush=True)
    runs = [row["runs"][_run_key(b, m, budget)] for b in args.bits for m in args.methods
            if _run_key(b, m, budget) in row["runs"]]
    return {**{k: v for k, v in row.items() if k != "runs"}, "budget": budget, "qat": runs}


def codebook_fit(oabn: str | None, args: argparse.Namespace) -> list[dict]:
    """How well each codebook form fits the fused weights before any training: per conv layer, the SQNR of every
    output channel's weights after the k-means initialization (per-layer vs per-channel codebook), and the spread of
    the channels' ranges (largest max |w| over the smallest non-zero one)."""
    import torch

    from repq.quant.qat_modules import CodebookQuantizer
    model, _ = repq.load_checkpoint(reference_checkpoint(quick=args.quick, oabn=oabn))
    fused = repq.reparameterize(model)
    rows = []
    for name, layer in fused.named_modules():
        if not isinstance(layer, torch.nn.Conv2d):
            continue
        w = layer.weight.detach()
        amax = w.abs().reshape(len(w), -1).amax(1)
        live = amax > 0
        row = {"layer": name, "range_spread": float(amax[live].max() / amax[live].min()), "sqnr": {}}
        for bits in args.bits:
            for scale in ("layer", "channel"):
                wq = CodebookQuantizer(w, bits, scale=scale).eval()(w)
                err = (w - wq).pow(2).reshape(len(w), -1).sum(1)[live]
                db = 10 * torch.log10(w.pow(2).reshape(len(w), -1).sum(1)[live] / err.clamp_min(1e-30))
                row["sqnr"][f"{bits}/{scale}"] = {"median": float(db.median()), "worst": float(db.min())}
        rows.append(row)
    return rows


def fit_table(variant: str, rows: list[dict], bits: list[int]) -> list[str]:
    lines = [f"### {variant}: codebook fit at initialization (per-channel weight SQNR, dB)", "",
             "| layer | channel range spread | " + " | ".join(
                 f"W{b} per-layer: median / worst | W{b} per-channel: median / worst" for b in bits) + " |",
             "|---|---|" + "---|---|" * len(bits)]
    for r in rows:
        cells = []
        for b in bits:
            for scale in ("layer", "channel"):
                v = r["sqnr"][f"{b}/{scale}"]
                cells.append(f"{v['median']:.1f} / {v['worst']:.1f}")
        lines.append(f"| {r['layer']} | {r['range_spread']:.0f}x | " + " | ".join(cells) + " |")
    worst = {(b, sc): min(r["sqnr"][f"{b}/{sc}"]["worst"] for r in rows) for b in bits for sc in ("layer", "channel")}
    lines += ["", "Worst channel of any layer: " + "; ".join(
        f"W{b} per-layer {worst[(b, 'layer')]:.1f} dB, per-channel {worst[(b, 'channel')]:.1f} dB" for b in bits)
        + f". Largest channel range spread: {max(r['range_spread'] for r in rows):.0f}x.", ""]
    return lines


def report(results: list[dict], args: argparse.Namespace) -> str:
    cmd = " ".join(["python benchmarks/qat_benchmark.py", *sys.argv[1:]])
    spec = reference_spec(args.quick)
    columns = sorted({(q["bits"], q["method"]) for r in results for q in r["qat"]}, key=lambda c: (-c[0], c[1]))
    budget = results[0]["budget"]
    settings = (f"QAT: {budget['epochs']} epoch(s) of SGD" + (f" capped at {budget['max_steps']} steps"
                                                             if budget["max_steps"] else "") + f", lr {budget['lr']}")
    lines = [f"# QAT and OABN: {spec['model']} on {spec['data']}", "",
             f"Command: `{cmd}` (seed 0; batch 128, no weight decay, 32 calibration images, first conv and last "
             f"linear at 8 bits; {settings})", f"Machine: {machine()}",
             "OABN twins: same recipe and seed as the plain reference; options "
             + "; ".join(f"{k}: {v}" for k, v in OABN_VARIANTS.items()) + ".", "",
             "| model | FP | PTQ W8A8 | PTQ W4A4 | " + " | ".join(
                 f"{METHODS[m][1]} W{b}A{b}" for b, m in columns)
             + " |", "|---|" + "---|" * (3 + len(columns))]
    for r in results:
        best_ptq = {b: max(p["top1"] for p in r["ptq"] if p["bits"] == b) for b in (8, 4)}
        by = {(q["bits"], q["method"]): f"{q['top1']:.2f}" for q in r["qat"]}
        lines.append(f"| {r['variant']} | {r['fp']:.2f} | {best_ptq[8]:.2f} | {best_ptq[4]:.2f} | "
                     + " | ".join(by.get(c, "-") for c in columns) + " |")
    lines += ["", "PTQ cells are the best of the recipes below; QAT cells are the converted (deploy) models.", "",
              "| model | PTQ recipe | W8A8 | W4A4 |", "|---|---|---|---|"]
    for r in results:
        for weight, granularity, activation, sequential in PTQ_RECIPES:
            cells = {p["bits"]: f"{p['top1']:.2f}" for p in r["ptq"]
                     if _ptq_key(p)[1:] == (weight, granularity, activation)}
            lines.append(f"| {r['variant']} | {weight}/{granularity} + {activation} "
                         f"({'sequential' if sequential else 'float pass'}) | {cells.get(8, '-')} | "
                         f"{cells.get(4, '-')} |")
    lines += ["", "| model | method | bits | start (PTQ init) | after QAT | drop vs FP | train min | images/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for q in r["qat"]:
            lines.append(f"| {r['variant']} | {q['method']} | W{q['bits']}A{q['bits']} | {q['start']:.2f} | "
                         f"{q['top1']:.2f} | {r['fp'] - q['top1']:.2f} | {q['seconds'] / 60:.1f} | "
                         f"{q['images_per_s']:.0f} |")
    lines += ["", "Training time of the float models: " + ", ".join(
        f"{r['variant']} {r['train_seconds'] / 60:.1f} min" for r in results if r["train_seconds"]) + ".", "",
        "## Targets"]
    for r in results:
        for bits, limit in TARGETS.items():
            for cluster in (q for q in r["qat"] if q["bits"] == bits and q["method"].startswith("cluster")):
                drop = r["fp"] - cluster["top1"]
                lines.append(f"- {r['variant']} + {METHODS[cluster['method']][1]} W{bits}A{bits} within {limit} pt "
                             f"of its FP: drop {drop:.2f} pt, {'met' if drop <= limit else 'NOT met'}.")
    for r in results:
        for bits in (3, 4):
            by = {q["method"]: q["top1"] for q in r["qat"] if q["bits"] == bits}
            for cluster in ("cluster", "cluster_channel"):
                if {"lsq", cluster} <= set(by):
                    verdict = "met" if by[cluster] >= by["lsq"] else "NOT met"
                    lines.append(f"- {r['variant']} W{bits}A{bits}: {METHODS[cluster][1]} {by[cluster]:.2f} vs LSQ "
                                 f"{by['lsq']:.2f}, at least as good: {verdict}.")
    for r in results:   # per-channel vs per-layer codebook, where both ran
        for bits in sorted({q["bits"] for q in r["qat"]}, reverse=True):
            by = {q["method"]: q["top1"] for q in r["qat"] if q["bits"] == bits}
            if {"cluster", "cluster_channel"} <= set(by):
                lines.append(f"- {r['variant']} W{bits}A{bits}: per-channel codebook {by['cluster_channel']:.2f} vs "
                             f"per-layer {by['cluster']:.2f} ({by['cluster_channel'] - by['cluster']:+.2f}).")
    if "cluster_channel" in args.methods:
        lines += ["", "## Why a per-channel codebook", "",
                  "Per-channel SQNR of the fused conv weights after the codebook's k-means initialization alone (no "
                  "training); the channel range spread is the largest channel max |w| over the smallest non-zero "
                  "one.", ""]
        for r in results:
            lines += fit_table(r["variant"], r["codebook_fit"], args.bits)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=1, help="QAT epochs per run")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--bits", default="6,4,3", help="QAT bit-widths (weights = activations)")
    parser.add_argument("--methods", default="lsq,cluster",
                        help="QAT methods: " + ", ".join(METHODS) + " ('' for FP and PTQ rows only)")
    parser.add_argument("--from-cache", action="store_true",
                        help="report the rows cached in runs/ (e.g. computed with different --bits per variant)")
    parser.add_argument("--max-steps", type=int, default=150, help="cap QAT steps per epoch (0: whole epochs)")
    parser.add_argument("--name", default="qat", help="result name: docs/results/NAME.md and NAME.json")
    parser.add_argument("--variants", default=None,
                        help="plain and/or OABN variants (" + ", ".join(OABN_VARIANTS) + "); default: all of them "
                             "(--quick: plain,relative)")
    args = parser.parse_args()
    args.bits = [4] if args.quick else [int(b) for b in args.bits.split(",")]
    args.methods = [m for m in args.methods.split(",") if m]
    if set(args.methods) - set(METHODS):
        parser.error(f"--methods takes {', '.join(METHODS)}")
    args.max_steps = args.max_steps or None
    if args.quick:
        args.epochs, args.max_steps = 1, 10
    variants = [v.strip() for v in (args.variants or ("plain,relative" if args.quick else
                                                      "plain," + ",".join(OABN_VARIANTS))).split(",")]
    unknown = set(variants) - {"plain", *OABN_VARIANTS}
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}")
    results = [run_variant(None if v == "plain" else v, args) for v in variants]
    if "cluster_channel" in args.methods:
        for v, r in zip(variants, results):
            r["codebook_fit"] = codebook_fit(None if v == "plain" else v, args)
    text = report(results, args)
    print(text)
    if not args.quick:
        write_result(args.name, text, {"results": results, "machine": machine(), "oabn_variants": OABN_VARIANTS})


if __name__ == "__main__":
    main()

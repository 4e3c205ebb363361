"""PTQ on the model zoo (benchmarks/zoo.py): repq's default and the baselines at W8A8, W6A6, W4A8 and W4A4,
3 calibration seeds (32 images from the train split each), full test split; per model and aggregated (mean drop,
worst model, worst seed). With --peers, ONNX Runtime quantize_static (MinMax, Entropy, Percentile), PyTorch FX PTQ
and NNCF (if installed) run on the same images at W8A8.

    python benchmarks/ptq_benchmark.py [--peers]      # the zoo (train it first: train_zoo.py), tens of minutes
    python benchmarks/ptq_benchmark.py --quick        # the tiny digits zoo, one seed, two bit-widths (seconds)

Every finished row is cached in runs/ptq_zoo_rows.json (REPQ_CACHE), so an interrupted run resumes; --from-cache
writes the tables from the cache alone.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import CACHE, PLAIN, machine, repq, write_result
from repq.io import atomic_write_text
from zoo import select, zoo, zoo_checkpoint

BITS = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8), "W4A4": (4, 4)}
# recipe -> (PTQConfig options, bit-widths it runs at). The baselines and P1's recipes are what they were before repq
# had activation equalization, the affine input grid and 8-bit edge layers (common.PLAIN): none of them, P1's max-abs
# input, every layer at the stated width; "repq default, every layer at W/A bits" is the default measured that way.
DEFAULT = "repq default (equalization + CFWS + auto + bias correction)"
BASELINE = "min-max/channel + percentile"
EVERY_LAYER = "repq default, every layer at W/A bits (edge layers too)"
RECIPES: dict[str, tuple[dict, tuple[str, ...]]] = {
    DEFAULT: ({}, tuple(BITS)),
    BASELINE: ({**PLAIN, "weight": "minmax", "activation": "percentile"}, tuple(BITS)),
    "CFWS + improved KL (P1, float inputs)": ({**PLAIN, "activation": "improved_kl"}, tuple(BITS)),
    "repq default, no equalization": ({"equalize": False}, tuple(BITS)),
    "repq default, P1's max-abs input grid": ({"input_activation": "minmax"}, ("W8A8",)),
    "repq default, no bias correction": ({"bias_correction": False}, tuple(BITS)),
    EVERY_LAYER: ({"edge_bits": None}, ("W6A6", "W4A8", "W4A4")),
    "CFWS + improved KL (P1, sequential)": ({**PLAIN, "activation": "improved_kl", "sequential": True}, ("W8A8",)),
    "CFWS + former improved KL (separate norm, 256-2048 bins, sequential)": (
        {**PLAIN, "activation": "improved_kl", "sequential": True, "kl_normalization": "separate",
         "kl_min_per_bin": 8.0}, ("W8A8",)),
    "min-max/tensor + min-max (naive)": ({**PLAIN, "weight": "minmax", "weight_granularity": "tensor",
                                          "activation": "minmax"}, ("W8A8",)),
}
QUICK_RECIPES = (DEFAULT, BASELINE)
PEERS = ("ORT quantize_static MinMax", "ORT quantize_static Entropy", "ORT quantize_static Percentile",
         "PyTorch FX PTQ (x86)", "NNCF PTQ (defaults)")


def load_rows(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.exists() else {}


def run_peers(model, train_ds, test_ds, seed: int, quick: bool) -> dict[str, float]:
    """Top-1 of each peer tool on the fused model with this seed's 32 calibration images."""
    from export_benchmark import ort_quantize_static
    from peer_benchmark import nncf_ptq, torch_fx_ptq
    from repq.export import export_onnx, run_onnx, top1
    fused = repq.reparameterize(model)
    calib = train_ds.calibration_images(32, seed)
    images, labels = test_ds.normalize(test_ds.images), test_ds.labels.numpy()
    out = {}
    with tempfile.TemporaryDirectory(prefix="repq-peers-") as tmp:
        fp_onnx = export_onnx(fused, Path(tmp) / "fp32.onnx", images[:1], allow_float=True)
        for method in (("MinMax",) if quick else ("MinMax", "Entropy", "Percentile")):
            path = ort_quantize_static(fp_onnx, Path(tmp) / f"{method}.onnx", calib.numpy(), method)
            out[f"ORT quantize_static {method}"] = top1(run_onnx(path, images.numpy()), labels)
    out["PyTorch FX PTQ (x86)"] = repq.evaluate(torch_fx_ptq(fused, calib), test_ds)["top1"]
    nncf_model = None if quick else nncf_ptq(fused, calib)
    if nncf_model is not None:
        out["NNCF PTQ (defaults)"] = repq.evaluate(nncf_model, test_ds)["top1"]
    return out


AGREEMENT_RECIPES = (DEFAULT, BASELINE)   # at W8A8: how many test predictions each one changes


@torch.no_grad()
def predictions(model, test_ds) -> torch.Tensor:
    """The model's top-1 class for every test image, in order."""
    model.eval()
    return torch.cat([model(images).argmax(1) for images, _ in test_ds.batches(256)])


def measure_agreement(name, model, train_ds, test_ds, seeds, rows, save) -> None:
    """Share of test images on which the W8A8 default and the baseline predict what the float model predicts. Why:
    a top-1 difference of a few hundredths of a point between two quantized models can be luck (each changes
    ~1-2 % of the predictions, in both directions); agreement with the float model measures fidelity itself.
    Also, per seed, the discordant test images (right under one recipe only) for McNemar's test."""
    fp_preds = None
    for seed in seeds:
        pair_key = f"{name}|discordant|W8A8|{seed}"
        if pair_key in rows and all(f"{name}|agreement|{r}|W8A8|{seed}" in rows for r in AGREEMENT_RECIPES):
            continue
        if fp_preds is None:
            fp_preds = predictions(repq.reparameterize(model), test_ds)
        correct = {}
        for recipe in AGREEMENT_RECIPES:
            key = f"{name}|agreement|{recipe}|W8A8|{seed}"
            q = repq.quantize(model, train_ds.calibration_images(32, seed),
                              repq.PTQConfig(num_samples=32, seed=seed, **RECIPES[recipe][0]))
            preds = predictions(q, test_ds)
            correct[recipe] = preds == test_ds.labels
            rows[key] = {"agreement": float((preds == fp_preds).double().mean() * 100),
                         "top1": float(correct[recipe].double().mean() * 100)}
            print(f"{name:28s} agreement {recipe[:40]:40s} seed {seed}: {rows[key]['agreement']:.2f} %", flush=True)
        rows[pair_key] = {"default_only": int((correct[DEFAULT] & ~correct[BASELINE]).sum()),
                          "baseline_only": int((correct[BASELINE] & ~correct[DEFAULT]).sum())}
        save()


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs split b / c under a fair coin."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def measure(names, entries, seeds, recipes, rows, cache_path, quick, peers) -> None:
    for name in names:
        spec = entries[name]
        model, _ = repq.load_checkpoint(zoo_checkpoint(name, quick=quick))
        train_ds, test_ds = repq.load_dataset(spec["data"], "train"), repq.load_dataset(spec["data"], "test")
        fp_key = f"{name}|fp"
        if fp_key not in rows:
            rows[fp_key] = {"top1": repq.evaluate(repq.reparameterize(model), test_ds)["top1"]}
        for recipe in recipes:
            options, bit_list = RECIPES[recipe]
            for bits in (b for b in bit_list if not quick or b in ("W8A8", "W4A8")):
                for seed in seeds:
                    key = f"{name}|{recipe}|{bits}|{seed}"
                    if key in rows:
                        continue
                    wb, ab = BITS[bits]
                    calib = train_ds.calibration_images(32, seed)
                    start = time.perf_counter()
                    q = repq.quantize(model, calib, repq.PTQConfig(w_bits=wb, a_bits=ab, num_samples=32, seed=seed,
                                                                   **options))
                    seconds = time.perf_counter() - start
                    meta = q.repq_quant
                    methods: dict[str, int] = {}
                    for layer in meta["layers"].values():
                        methods[layer["calibrator"]] = methods.get(layer["calibrator"], 0) + 1
                    guard = (meta.get("auto") or {}).get("guard") or {}
                    rows[key] = {"top1": repq.evaluate(q, test_ds)["top1"], "ptq_seconds": seconds,
                                 "calibrators": methods, "guard_fallbacks": len(guard.get("fallbacks", []))}
                    print(f"{name:28s} {recipe[:40]:40s} {bits} seed {seed}: {rows[key]['top1']:6.2f} "
                          f"(FP {rows[fp_key]['top1']:.2f}) {seconds:5.1f} s", flush=True)
                    if not quick:
                        atomic_write_text(cache_path, json.dumps(rows, indent=1))
        if not quick:
            measure_agreement(name, model, train_ds, test_ds, seeds, rows,
                              lambda: atomic_write_text(cache_path, json.dumps(rows, indent=1)))
        if peers:
            for seed in seeds:
                key = f"{name}|peers|W8A8|{seed}"
                if key not in rows:
                    rows[key] = run_peers(model, train_ds, test_ds, seed, quick)
                    print(f"{name:28s} peers seed {seed}: {rows[key]}", flush=True)
                    if not quick:
                        atomic_write_text(cache_path, json.dumps(rows, indent=1))


def summarize(names, seeds, recipes, rows, peers) -> tuple[list[dict], list[dict]]:
    """Per (model, recipe, bits): mean / worst seed; aggregated per (recipe, bits) over the models."""
    per_model = []
    for name in names:
        fp = rows[f"{name}|fp"]["top1"]
        combos = [(r, b) for r in recipes for b in RECIPES[r][1]]
        if peers:
            combos += [(p, "W8A8") for p in PEERS]
        for recipe, bits in combos:
            if recipe in PEERS:
                accs = [rows.get(f"{name}|peers|W8A8|{s}", {}).get(recipe) for s in seeds]
            else:
                accs = [rows.get(f"{name}|{recipe}|{bits}|{s}", {}).get("top1") for s in seeds]
            accs = [a for a in accs if a is not None]
            if not accs:
                continue
            seconds = [rows[f"{name}|{recipe}|{bits}|{s}"]["ptq_seconds"] for s in seeds
                       if f"{name}|{recipe}|{bits}|{s}" in rows]
            per_model.append({"model": name, "recipe": recipe, "bits": bits, "fp": fp, "seeds": len(accs),
                              "top1_mean": statistics.mean(accs), "top1_per_seed": accs,
                              "drop_mean": fp - statistics.mean(accs), "drop_worst_seed": fp - min(accs),
                              "ptq_seconds": max(seconds) if seconds else None})
    aggregate = []
    keys = sorted({(r["recipe"], r["bits"]) for r in per_model},
                  key=lambda k: (list(BITS).index(k[1]), k[0] not in (DEFAULT, BASELINE), k[0]))
    for recipe, bits in keys:
        group = [r for r in per_model if (r["recipe"], r["bits"]) == (recipe, bits)]
        base = {r["model"]: r for r in per_model if (r["recipe"], r["bits"]) == (BASELINE, bits)}
        worst = max(group, key=lambda r: r["drop_mean"])
        vs_base = [r["top1_mean"] - base[r["model"]]["top1_mean"] for r in group if r["model"] in base]
        aggregate.append({"recipe": recipe, "bits": bits, "models": len(group),
                          "mean_drop": statistics.mean(r["drop_mean"] for r in group),
                          "worst_drop": worst["drop_mean"], "worst_model": worst["model"],
                          "worst_seed_drop": max(r["drop_worst_seed"] for r in group),
                          "min_vs_baseline": min(vs_base) if vs_base else None,
                          "mean_top1": statistics.mean(r["top1_mean"] for r in group)})
    return per_model, aggregate


def summarize_agreement(names, seeds, rows) -> list[dict]:
    out = []
    for name in names:
        got = {r: [rows.get(f"{name}|agreement|{r}|W8A8|{s}") for s in seeds] for r in AGREEMENT_RECIPES}
        if any(v is None for vals in got.values() for v in vals):
            continue
        default, baseline = got[DEFAULT], got[BASELINE]
        out.append({"model": name, "default": statistics.mean(v["agreement"] for v in default),
                    "default_min": min(v["agreement"] for v in default),
                    "baseline": statistics.mean(v["agreement"] for v in baseline),
                    "baseline_min": min(v["agreement"] for v in baseline),
                    "top1_diff": statistics.mean(v["top1"] for v in default)
                    - statistics.mean(v["top1"] for v in baseline)})
        pairs = [rows.get(f"{name}|discordant|W8A8|{s}") for s in seeds]
        if all(pairs):
            b, c = (sum(p[k] for p in pairs) for k in ("default_only", "baseline_only"))
            out[-1].update(default_only=b, baseline_only=c, p=mcnemar_p(b, c))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3, help="calibration seeds 0..N-1")
    parser.add_argument("--only", default="", help="comma-separated zoo entries (default: all)")
    parser.add_argument("--peers", action="store_true", help="also ORT quantize_static, PyTorch FX and NNCF (W8A8)")
    parser.add_argument("--from-cache", action="store_true", help="write the tables from the cached rows only")
    args = parser.parse_args()
    entries = zoo(args.quick)
    names = select(args.only, args.quick)
    seeds = [0] if args.quick else list(range(args.seeds))
    recipes = list(QUICK_RECIPES) if args.quick else list(RECIPES)
    cache_path = CACHE / "ptq_zoo_rows.json"
    rows = {} if args.quick else load_rows(cache_path)
    if not args.from_cache:
        measure(names, entries, seeds, recipes, rows, cache_path, args.quick, args.peers)
    names = [n for n in names if f"{n}|fp" in rows]
    per_model, aggregate = summarize(names, seeds, recipes, rows, args.peers or args.from_cache)
    cmd = "python benchmarks/ptq_benchmark.py" + (" --quick" if args.quick else "") + (
        " --peers" if args.peers else "") + (f" --only {args.only}" if args.only else "")
    lines = ["# PTQ on the model zoo", "",
             f"Command: `{cmd}` (calibration seeds {seeds}, 32 images from the train split each; full test split; "
             "zoo: docs/results/zoo.md)", f"Machine: {machine()}", "",
             "## Aggregate over the zoo", "",
             f"Drops are FP minus quantized top-1 in points; `vs baseline` is the smallest (quantized top-1 minus "
             f"'{BASELINE}') over the models. repq's default: activation equalization, CFWS weights, `auto` ranges "
             "with the guard, bias correction, an affine input grid and, below 8 bits, 8-bit input and output "
             "layers. The baselines and P1's recipes run without any of these (every layer at the stated width); "
             f"'{EVERY_LAYER}' is the default measured that way.", "",
             "| bits | recipe | models | mean top-1 | mean drop | worst model drop | worst model | worst seed drop | "
             "min vs baseline |", "|---|---|---|---|---|---|---|---|---|"]
    for a in aggregate:
        vs = "" if a["min_vs_baseline"] is None else f"{a['min_vs_baseline']:+.2f}"
        lines.append(f"| {a['bits']} | {a['recipe']} | {a['models']} | {a['mean_top1']:.2f} | {a['mean_drop']:+.2f} | "
                     f"{a['worst_drop']:+.2f} | {a['worst_model']} | {a['worst_seed_drop']:+.2f} | {vs} |")
    agreement = summarize_agreement(names, seeds, rows)
    if agreement:
        lines += ["", "## Fidelity at W8A8: agreement with the float model's predictions", "",
                  "Share of test images on which the quantized model predicts the float model's class (mean over the "
                  "seeds, lowest seed beside it), and the top-1 difference default - baseline. A top-1 difference of a "
                  "few hundredths can be luck; agreement measures how much each recipe changes. Discordant: test "
                  "images right under one recipe only, summed over the seeds; p: two-sided exact McNemar test of "
                  "default vs baseline on those (the seeds share the test images, so it is indicative).", "",
                  "| model | default agreement % (lowest seed) | baseline agreement % (lowest seed) | "
                  "top-1 default - baseline | discordant: default only / baseline only | McNemar p |",
                  "|---|---|---|---|---|---|"]
        for a in agreement:
            pair = (f"{a['default_only']} / {a['baseline_only']} | {a['p']:.2f}" if "p" in a else "- | -")
            lines.append(f"| {a['model']} | {a['default']:.2f} ({a['default_min']:.2f}) | {a['baseline']:.2f} "
                         f"({a['baseline_min']:.2f}) | {a['top1_diff']:+.2f} | {pair} |")
        lines.append(f"| mean | {statistics.mean(a['default'] for a in agreement):.2f} | "
                     f"{statistics.mean(a['baseline'] for a in agreement):.2f} | | | |")
    lines += ["", "## Per model", "", "| model | FP | bits | recipe | top-1 mean | per seed | drop mean | "
              "drop worst seed | PTQ s (max) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in per_model:
        seconds = "" if r["ptq_seconds"] is None else f"{r['ptq_seconds']:.1f}"
        lines.append(f"| {r['model']} | {r['fp']:.2f} | {r['bits']} | {r['recipe']} | {r['top1_mean']:.2f} | "
                     f"{' / '.join(f'{a:.2f}' for a in r['top1_per_seed'])} | {r['drop_mean']:+.2f} | "
                     f"{r['drop_worst_seed']:+.2f} | {seconds} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("ptq", text, {"aggregate": aggregate, "per_model": per_model, "seeds": seeds,
                                   "agreement": agreement, "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()

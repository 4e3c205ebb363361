"""Detection: PTQ of the YOLOv6-N-like detector on composed Fashion-MNIST scenes (benchmarks/detection_common.py),
COCO mAP@0.5:0.95 and mAP@0.5 on the 1000 val scenes.

    python benchmarks/detection_benchmark.py            # trains the detector first if it is not cached (~45 min)
    python benchmarks/detection_benchmark.py --quick    # a tiny detector on digits scenes (a minute)
    python benchmarks/detection_benchmark.py --render-only   # the tables from the cached rows

Parts: every PTQ recipe at W8A8 (32 train images; 3 calibration seeds for repq's default, the baselines and P1's
improved KL, seed 0 for the others) and repq's default and the baseline at W6A6 / W4A8; ONNX Runtime quantize_static (MinMax, Entropy, Percentile; per-channel int8 weights, uint8
activations, the same images); ONNX Runtime mAP of repq's exports (exact CFWS and two-branch) beside the
simulation; per-layer sensitivity of the naive recipe and partial quantization (k most sensitive layers in float);
QAT (LSQ, ClusterQAT) at W6A6 / W4A4: 120 steps of 32 images, and 3 epochs at W4A4, on the plain and (if trained)
the OABN detector; on the OABN detector also a higher learning rate, distillation from the float detector,
10 and 20 epochs, and LSQ+ affine grids for the SiLU-fed head convs (QATConfig.affine_activations; the
20-epoch run also with seed 1: other calibration images, data order and initialization). Edge layers (the stem and the six prediction convs) at 8 bits, as QATConfig's default.
Rows are cached in runs/detect/rows.json (REPQ_CACHE), so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch

from common import CACHE, PLAIN, machine, repq, write_result
from detection_common import DETECTORS, QUICK, detector_checkpoint
from export_benchmark import ort_quantize_static
from repq.data.detection import load_detection
from repq.detect.training import DetectTrainConfig, evaluate_detection, train_detector
from repq.io import atomic_write_text

RECIPES = {   # name -> PTQConfig options
    "min-max/tensor + min-max (naive)": {**PLAIN, "weight": "minmax", "weight_granularity": "tensor",
                                         "activation": "minmax"},
    "min-max/channel + min-max": {**PLAIN, "weight": "minmax", "activation": "minmax"},
    "min-max/channel + percentile": {**PLAIN, "weight": "minmax", "activation": "percentile"},
    "CFWS + min-max": {**PLAIN, "activation": "minmax"},
    "CFWS + percentile": {**PLAIN, "activation": "percentile"},
    "CFWS + MSE": {**PLAIN, "activation": "mse"},
    "CFWS + KL": {**PLAIN, "activation": "kl"},
    "CFWS + improved KL (P1)": {**PLAIN, "activation": "improved_kl"},
    "CFWS + auto": dict(PLAIN),
    "repq default (equalization + CFWS + auto + bias correction)": {},
}
DEFAULT, BASELINE = "repq default (equalization + CFWS + auto + bias correction)", "min-max/channel + percentile"
NAIVE = "min-max/tensor + min-max (naive)"
SEEDED = (DEFAULT, BASELINE, NAIVE, "CFWS + improved KL (P1)")   # 3 calibration seeds; the other recipes seed 0
LOW_BITS = {"W6A6": (6, 6), "W4A8": (4, 8)}
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
class QATRun(NamedTuple):
    method: str
    w_bits: int
    a_bits: int
    epochs: int
    steps: int | None = None   # per epoch (None: all)
    detectors: str = "all"     # "all" or "oabn" (the OABN detector only)
    lr: float = 0.002
    distill: float = 0.0
    affine: bool = False       # QATConfig.affine_activations (LSQ+ grids for the SiLU-fed head convs)
    seed: int = 0              # calibration images, data order and initialization


QAT_RUNS = {"LSQ W6A6": QATRun("lsq", 6, 6, 1, 120),
            "LSQ W4A4": QATRun("lsq", 4, 4, 1, 120),
            "ClusterQAT W4A4": QATRun("cluster", 4, 4, 1, 120),
            "ClusterQAT W4A4, 3 epochs": QATRun("cluster", 4, 4, 3),
            "LSQ W4A4, 3 epochs": QATRun("lsq", 4, 4, 3, detectors="oabn"),
            "ClusterQAT W4A4, 3 epochs, lr 0.006": QATRun("cluster", 4, 4, 3, detectors="oabn", lr=0.006),
            "ClusterQAT W4A4, 3 epochs, lr 0.006, distillation 1": QATRun("cluster", 4, 4, 3, detectors="oabn",
                                                                          lr=0.006, distill=1.0),
            "ClusterQAT W4A4, 10 epochs, lr 0.006, distillation 1": QATRun("cluster", 4, 4, 10, detectors="oabn",
                                                                           lr=0.006, distill=1.0),
            "ClusterQAT W4A4, 20 epochs, lr 0.006, distillation 1": QATRun("cluster", 4, 4, 20, detectors="oabn",
                                                                           lr=0.006, distill=1.0),
            "ClusterQAT W4A4, 3 epochs, lr 0.006, distillation 1, affine activations": QATRun(
                "cluster", 4, 4, 3, detectors="oabn", lr=0.006, distill=1.0, affine=True),
            "ClusterQAT W4A4, 20 epochs, lr 0.006, distillation 1, affine activations": QATRun(
                "cluster", 4, 4, 20, detectors="oabn", lr=0.006, distill=1.0, affine=True),
            "ClusterQAT W4A4, 20 epochs, lr 0.006, distillation 1, affine activations, seed 1": QATRun(
                "cluster", 4, 4, 20, detectors="oabn", lr=0.006, distill=1.0, affine=True, seed=1)}


class Rows:
    """Finished measurements, cached on disk after each one (resumable)."""

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.rows = {} if fresh or not path.exists() else json.loads(path.read_text())

    def get(self, key: str, compute):
        if key not in self.rows:
            began = time.perf_counter()
            value = compute()
            value["seconds"] = time.perf_counter() - began
            value["threads"] = torch.get_num_threads()
            if self.path.exists():   # another run (e.g. --only-qat beside the PTQ part) may have added rows
                self.rows = {**json.loads(self.path.read_text()), **self.rows}
            self.rows[key] = value
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.rows, indent=1))
            print(f"{key}: " + ", ".join(f"{k} {v:.2f}" for k, v in value.items() if isinstance(v, float)),
                  flush=True)
        return self.rows[key]


def metrics(m: dict) -> dict:
    return {"map": m["map"], "map50": m["map50"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--render-only", action="store_true", help="write the tables from the cached rows")
    parser.add_argument("--fresh", action="store_true", help="ignore the cached rows")
    parser.add_argument("--skip-qat", action="store_true", help="leave out the QAT part")
    parser.add_argument("--only-qat", action="store_true", help="the QAT part alone (it can run beside --skip-qat)")
    args = parser.parse_args()
    quick = args.quick
    name = "pico_digits" if quick else "yolov6n_fmnist"
    seeds = (0,) if quick else (0, 1, 2)
    rows = Rows(CACHE / "detect" / ("rows_quick.json" if quick else "rows.json"), args.fresh)
    if not args.render_only:
        measure(rows, name, seeds, quick, args.skip_qat, args.only_qat)
    text, data = render(rows.rows, name, seeds, quick)
    print(text)
    if not quick:
        write_result("detection", text, data)


def measure(rows: Rows, name: str, seeds, quick: bool, skip_qat: bool, only_qat: bool = False) -> None:
    path = detector_checkpoint(name, quick)
    model, payload = repq.load_checkpoint(path)
    spec = payload["detector_spec"]
    train = load_detection(spec["data"], "train")
    val = load_detection(spec["data"], "test")
    if quick:
        val = val.subset(64)
    rows.get(f"{name}|fp", lambda: {**metrics(evaluate_detection(model, val)),
                                    "train_minutes": float(payload["train_minutes"]),
                                    "history": payload["history"]["epochs"]})
    if not only_qat:
        measure_ptq(rows, name, model, train, val, seeds, quick)
    if not skip_qat:
        measure_qat(rows, name, train, val, quick)


def measure_ptq(rows: Rows, name: str, model, train, val, seeds, quick: bool) -> None:
    from repq.export import OnnxRuntimeModel, export_onnx
    from repq.export.verify import integer_kernels

    fused = repq.reparameterize(model, val.head(2)[0])
    rows.get(f"{name}|fused", lambda: metrics(evaluate_detection(fused, val)))
    recipes = {k: v for k, v in RECIPES.items() if not quick or k in (DEFAULT, BASELINE, NAIVE)}
    for recipe, options in recipes.items():
        for seed in seeds if recipe in SEEDED else seeds[:1]:
            def run(options=options, seed=seed):
                config = repq.PTQConfig(seed=seed, **options)
                began = time.perf_counter()
                q = repq.quantize(model, train.calibration_images(32, seed), config)
                seconds = time.perf_counter() - began
                return {**metrics(evaluate_detection(q, val)), "ptq_seconds": seconds,
                        "bias_grid_widened": q.repq_quant.get("bias_grid_widened", {})}
            rows.get(f"{name}|W8A8|{recipe}|{seed}", run)
    for bits, (wb, ab) in LOW_BITS.items():
        for recipe in (DEFAULT, BASELINE, "CFWS + improved KL (P1)") if not quick else (DEFAULT,):
            def run(recipe=recipe, wb=wb, ab=ab):
                q = repq.quantize(model, train.calibration_images(32, 0),
                                  repq.PTQConfig(w_bits=wb, a_bits=ab, **RECIPES[recipe]))
                return metrics(evaluate_detection(q, val))
            rows.get(f"{name}|{bits}|{recipe}|0", run)
    with tempfile.TemporaryDirectory(prefix="repq-det-") as tmp:
        tmp = Path(tmp)
        fp_onnx = export_onnx(fused, tmp / "fp32.onnx", val.head(1)[0], allow_float=True)
        for method in ORT_METHODS if not quick else ("MinMax",):
            for seed in seeds:
                def run(method=method, seed=seed):
                    out = ort_quantize_static(fp_onnx, tmp / f"ort_{method}_{seed}.onnx",
                                              train.calibration_images(32, seed).numpy(), method)
                    return metrics(evaluate_detection(OnnxRuntimeModel(out), val))
                rows.get(f"{name}|W8A8|ORT quantize_static {method}|{seed}", run)
        for deploy in ("exact", "two_branch"):
            def run(deploy=deploy):
                q = repq.quantize(model, train.calibration_images(32, 0), repq.PTQConfig(cfws_deploy=deploy))
                onnx_path = export_onnx(q, tmp / f"repq_{deploy}.onnx", val.head(1)[0])
                sim = evaluate_detection(q, val)
                ort = evaluate_detection(OnnxRuntimeModel(onnx_path), val)
                kernels = integer_kernels(onnx_path)
                return {"sim_map": sim["map"], "ort_map": ort["map"], "sim_map50": sim["map50"],
                        "ort_map50": ort["map50"], "sim_images_per_s": sim["images_per_s"],
                        "ort_images_per_s": ort["images_per_s"],
                        "kernels": {k: kernels.get(k, 0) for k in ("QLinearConv", "ConvInteger", "QLinearAdd",
                                                                    "Conv", "FusedConv")}}
            rows.get(f"{name}|ort|{deploy}", run)
    # why a fused detector is hard to quantize: repq analyze (report + plots next to the table)
    def analysis():
        from common import RESULTS
        out = None if quick else RESULTS / "detection_analysis"
        result = repq.analyze(model, train.calibration_images(32, 0), out)
        worst = sorted(result["layers"], key=lambda r: -r["center_surround_ratio"])[:5]
        return {"findings": result["findings"][:8], "worst_layers": worst}
    rows.get(f"{name}|analysis", analysis)
    # sensitivity of the naive recipe, then partial quantization
    naive = RECIPES[NAIVE]

    def sensitivity():
        from repq.analysis.sensitivity import layer_sensitivity
        q = repq.quantize(model, train.calibration_images(32, 0), repq.PTQConfig(**naive))
        subset = val.subset(16 if quick else 200)   # quick: one evaluation per layer, so a quarter of its scenes
        base, ranking = layer_sensitivity(q, lambda net: evaluate_detection(net, subset)["map"])
        return {"float_map": base, "images": len(subset), "ranking": ranking}
    ranking = rows.get(f"{name}|sensitivity|naive", sensitivity)["ranking"]
    for k in (1, 3, 5):
        def run(k=k):
            keep = tuple(r["layer"] for r in ranking[:k])
            q = repq.quantize(model, train.calibration_images(32, 0), repq.PTQConfig(**naive, skip_layers=keep))
            return {**metrics(evaluate_detection(q, val)), "kept": list(keep)}
        rows.get(f"{name}|partial|naive|{k}", run)


def measure_qat(rows: Rows, name: str, train, val, quick: bool) -> None:
    qat_models = [name] + ([n for n in ("yolov6n_fmnist_oabn",) if (CACHE / "detect" / f"{n}.pt").exists()]
                           if not quick else [])
    for detector in sorted(qat_models, key=lambda d: "oabn" not in d):   # the OABN detector first
        fp_model, fp_payload = repq.load_checkpoint(detector_checkpoint(detector, quick))
        if detector != name:
            rows.get(f"{detector}|fp", lambda: {**metrics(evaluate_detection(fp_model, val)),
                                                "train_minutes": float(fp_payload["train_minutes"]),
                                                "history": fp_payload["history"]["epochs"]})
            rows.get(f"{detector}|W4A4|{DEFAULT}|0", lambda: metrics(evaluate_detection(
                repq.quantize(fp_model, train.calibration_images(32, 0), repq.PTQConfig(w_bits=4, a_bits=4)), val)))
        for run_name, (method, wb, ab, epochs, steps, which, lr, distill, affine, seed) in QAT_RUNS.items():
            if which == "oabn" and "oabn" not in detector:
                continue

            def run(method=method, wb=wb, ab=ab, epochs=epochs, steps=steps, fp_model=fp_model, lr=lr,
                    distill=distill, affine=affine, seed=seed):
                torch.manual_seed(seed)
                config = repq.QATConfig(method=method, w_bits=wb, a_bits=ab, affine_activations=affine, seed=seed)
                qat = repq.prepare_qat(fp_model, config, train.calibration_images(config.num_samples, seed))
                qat.num_classes, qat.strides = fp_model.num_classes, fp_model.strides
                start = metrics(evaluate_detection(qat, val))
                budget = DetectTrainConfig(epochs=1 if quick else epochs, batch_size=32, lr=lr, warmup_epochs=0.0,
                                           ema_decay=0.0, max_steps_per_epoch=4 if quick else steps, seed=seed,
                                           distill=distill)
                began = time.perf_counter()
                history = train_detector(qat, train, budget, progress=True, teacher=fp_model if distill else None)
                minutes = (time.perf_counter() - began) / 60
                q = repq.convert_qat(qat)
                steps_run = budget.epochs * (budget.max_steps_per_epoch or -(-len(train) // budget.batch_size))
                return {**metrics(evaluate_detection(q, val)), "start_map": start["map"], "train_minutes": minutes,
                        "steps": steps_run, "batch_size": budget.batch_size,
                        "epoch_images_per_s": [e["images_per_s"] for e in history["epochs"]]}
            rows.get(f"{detector}|qat|{run_name}", run)


def render(rows: dict, name: str, seeds, quick: bool) -> tuple[str, dict]:
    fp = rows[f"{name}|fp"]
    spec = (QUICK if quick else DETECTORS)[name]
    cmd = "python benchmarks/detection_benchmark.py" + (" --quick" if quick else "")
    lines = ["# Detection: PTQ and QAT of a YOLOv6-N-like detector", "",
             f"Command: `{cmd}` (trains the detector once with `python benchmarks/detection_common.py`)",
             f"Machine: {machine().rsplit(', ', 2)[0]}; torch threads per measurement: "
             + ", ".join(f"{t} ({n} rows)" for t, n in sorted(Counter(r.get('threads', '?') for r in rows.values()
                                                                     if isinstance(r, dict)).items(), key=str))
             + "; " + machine().rsplit(", ", 1)[1], "",
             f"Detector: `{spec['model']}` {spec['model_kwargs'] or ''} trained on `{spec['data']}` "
             f"({spec['train']['epochs']} epochs, batch {spec['train']['batch_size']}, lr {spec['train']['lr']}, "
             f"seed {spec['train']['seed']}). Val: "
             f"{'64' if quick else '1000'} composed scenes; COCO mAP by pycocotools; 32 calibration images from the "
             "train split per seed.", "",
             f"FP: mAP@0.5:0.95 **{fp['map']:.2f}**, mAP@0.5 {fp['map50']:.2f} (fused: "
             f"{rows[f'{name}|fused']['map']:.2f}).", ""]
    for detector in sorted({k.split("|")[0] for k in rows if k.endswith("|fp")}):
        history = rows[f"{detector}|fp"]["history"]
        rates = [e["images_per_s"] for e in history]
        images = rates[0] * history[0]["seconds"]
        lines.append(f"- `{detector}`: FP mAP@0.5:0.95 {rows[f'{detector}|fp']['map']:.2f}; trained in "
                     f"{rows[f'{detector}|fp']['train_minutes']:.0f} min wall time, at {min(rates):.0f}-{max(rates):.0f} "
                     f"images/s per epoch (the 2 cores were shared with other jobs for part of it; at the best "
                     f"epoch's rate the {len(history)} epochs take {len(history) * images / max(rates) / 60:.0f} min). "
                     "Val mAP by epoch (300 val scenes): "
                     + ", ".join(f"{e['map']:.1f}" for e in history if "map" in e) + ".")
    lines += ["",
             "## W8A8 PTQ recipes", "",
             "| recipe | mAP@0.5:0.95 mean | per seed | drop mean | drop worst seed | mAP@0.5 mean |",
             "|---|---|---|---|---|---|"]
    data = {"fp": fp, "rows": rows, "machine": machine()}
    recipes = list(RECIPES) + [f"ORT quantize_static {m}" for m in ORT_METHODS]
    summary = {}
    for recipe in recipes:
        found = [rows[k] for s in seeds if (k := f"{name}|W8A8|{recipe}|{s}") in rows]
        if not found:
            continue
        maps = [r["map"] for r in found]
        summary[recipe] = statistics.mean(maps)
        lines.append(f"| {recipe} | {statistics.mean(maps):.2f} | {' / '.join(f'{m:.2f}' for m in maps)} | "
                     f"{fp['map'] - statistics.mean(maps):+.2f} | {fp['map'] - min(maps):+.2f} | "
                     f"{statistics.mean(r['map50'] for r in found):.2f} |")
    data["w8a8_mean_map"] = summary
    peers = {k: v for k, v in summary.items() if k.startswith("ORT")}
    if DEFAULT in summary and NAIVE in summary and peers:
        best_peer = max(peers, key=peers.get)
        default_maps = [rows[k]["map"] for s in seeds if (k := f"{name}|W8A8|{DEFAULT}|{s}") in rows]
        lines += ["", f"Summary: naive per-tensor min-max loses {fp['map'] - summary[NAIVE]:.2f} mAP; repq's default "
                  f"loses {fp['map'] - summary[DEFAULT]:.2f} (worst seed {fp['map'] - min(default_maps):.2f}); the best "
                  f"ONNX Runtime method ({best_peer.removeprefix('ORT quantize_static ')}) loses "
                  f"{fp['map'] - peers[best_peer]:.2f}."]
    lines += ["", "## Lower bit-widths (PTQ, seed 0)", "", "| bits | recipe | mAP@0.5:0.95 | drop | mAP@0.5 |",
              "|---|---|---|---|---|"]
    for bits in LOW_BITS:
        for recipe in RECIPES:
            r = rows.get(f"{name}|{bits}|{recipe}|0")
            if r:
                lines.append(f"| {bits} | {recipe} | {r['map']:.2f} | {fp['map'] - r['map']:+.2f} | {r['map50']:.2f} |")
    lines += ["", "## repq's exports in ONNX Runtime (default recipe, seed 0)", "",
              "| CFWS deployment | simulation mAP | ONNX Runtime mAP | difference | ORT kernels | ORT images/s |",
              "|---|---|---|---|---|---|"]
    for deploy in ("exact", "two_branch"):
        r = rows.get(f"{name}|ort|{deploy}")
        if r:
            kernels = ", ".join(f"{k} {v}" for k, v in r["kernels"].items() if v)
            lines.append(f"| {deploy} | {r['sim_map']:.2f} | {r['ort_map']:.2f} | {r['ort_map'] - r['sim_map']:+.2f} "
                         f"| {kernels} | {r['ort_images_per_s']:.0f} |")
    analysis = rows.get(f"{name}|analysis")
    if analysis:
        lines += ["", "## Why: `repq analyze` on the detector" + ("" if quick else
                  " ([full report](detection_analysis/report.md))"), ""]
        lines += [f"- {f}" for f in analysis["findings"][:5]] or ["- no layer has center taps over 10x its surround"]
    sens = rows.get(f"{name}|sensitivity|naive")
    if sens:
        lines += ["", f"## Sensitivity of the naive recipe (one layer quantized at a time, {sens['images']} val "
                  f"images, float {sens['float_map']:.2f})", "", "| rank | layer | mAP with only it quantized | loss |",
                  "|---|---|---|---|"]
        for i, r in enumerate(sens["ranking"][:8], start=1):
            lines.append(f"| {i} | {r['layer']} | {r['metric']:.2f} | {r['loss']:+.2f} |")
        lines += ["", "Partial quantization (naive recipe, the k most sensitive layers kept in float):", "",
                  "| k | mAP@0.5:0.95 | drop |", "|---|---|---|"]
        naive = [rows[k]["map"] for s in seeds if (k := f"{name}|W8A8|{NAIVE}|{s}") in rows]
        if naive:
            lines.append(f"| 0 | {naive[0]:.2f} | {fp['map'] - naive[0]:+.2f} |")
        for k in (1, 3, 5):
            r = rows.get(f"{name}|partial|naive|{k}")
            if r:
                lines.append(f"| {k} | {r['map']:.2f} | {fp['map'] - r['map']:+.2f} |")
    qat_rows = [(k.split("|")[0], k.split("|")[2], v) for k, v in rows.items() if k.split("|")[1] == "qat"]
    order = list(QAT_RUNS)
    qat_rows.sort(key=lambda r: ("oabn" not in r[0], order.index(r[1]) if r[1] in order else len(order)))
    if qat_rows:
        lines += ["", "## QAT (short budget)", "",
                  "Edge layers at 8 bits (QATConfig's default: the stem and the six class / box prediction convs, "
                  "traced from the graph); SGD at lr 0.002 unless the run says otherwise, no warmup, no EMA; "
                  "'distillation 1' adds the float detector's prediction distillation with weight 1 "
                  "(`repq qat --distill 1`); 'affine activations' gives the inputs with negative values (the six "
                  "SiLU-fed head convs) unsigned codes with a learned zero point, LSQ+ "
                  "(`repq qat --affine-activations`).", "",
                  "| detector | FP mAP | run | PTQ start mAP | after QAT mAP | drop vs FP | steps x batch | minutes |",
                  "|---|---|---|---|---|---|---|---|"]
        notes = []
        for detector, run, r in qat_rows:
            base = rows[f"{detector}|fp"]["map"]
            mark = ""
            if r.get("note"):
                notes.append(r["note"])
                mark = " " + "*" * len(notes)
            lines.append(f"| {detector} | {base:.2f} | {run} | {r['start_map']:.2f} | {r['map']:.2f} | "
                         f"{base - r['map']:+.2f} | {r['steps']} x {r['batch_size']} | "
                         f"{r['train_minutes']:.1f}{mark} |")
        lines += [""] + [f"{'*' * (i + 1)} {note}" for i, note in enumerate(notes)] if notes else []
    return "\n".join(lines) + "\n", data


if __name__ == "__main__":
    main()

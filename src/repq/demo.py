"""`repq demo` / `make demo`: train a small RepVGG, fuse it, quantize it with every PTQ recipe, print the table,
write the checkpoints, a markdown table and plots.

The digits setup is the zoo's digits_b0_quarter_ls recipe (RepVGG-B0 at quarter width, label smoothing, no
augmentation): a model on which naive per-tensor INT8 collapses (the RepVGG failure users report), so the first
look shows the problem and repq's default recovering from it. The zoo (docs/results/ptq.md) shows how often and
how badly that happens across models."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import repq
from repq.analysis import analyze
from repq.analysis.plots import plot_accuracy_bars
from repq.io import atomic_write_text
from repq.quant.calibrators import ACTIVATION_METHODS
from repq.tables import format_table

DEMO_SETUPS = {
    "digits": dict(model="repvgg_b0", model_kwargs=dict(small_input=True, width_scale=0.25),
                   train=dict(epochs=40, batch_size=32, lr=0.05, weight_decay=1e-4, label_smoothing=0.1,
                              augment=False, seed=8)),
    "fashion-mnist": dict(model="repvgg_a0", model_kwargs=dict(small_input=False, width_scale=0.5),
                          train=dict(epochs=2, batch_size=128, lr=0.1, seed=0)),
}
# (weight method, granularity) rows of the W8A8 table: per-tensor min-max is the naive RepVGG failure case.
WEIGHT_RECIPES = [("minmax", "tensor"), ("minmax", "channel"), ("mse", "channel"), ("cfws", "channel"),
                  ("cfws_whole", "channel")]


def _first(data: repq.ImageDataset, n: int) -> tuple:
    return data.normalize(data.images[:n]), data.labels[:n]


def run_demo(out: str = "runs/demo", data: str = "digits", epochs: int | None = None,
             progress: bool = True) -> tuple[dict[str, Any], str]:
    if data not in DEMO_SETUPS:
        raise repq.RepqError(f"the demo runs on {' or '.join(DEMO_SETUPS)}, not '{data}'")
    setup = DEMO_SETUPS[data]
    out_dir = Path(out)
    train_ds, test_ds = repq.load_dataset(data, "train"), repq.load_dataset(data, "test")
    train_cfg = repq.TrainConfig(**{**setup["train"], **({"epochs": epochs} if epochs else {})})
    torch.manual_seed(train_cfg.seed)
    model = repq.create_model(setup["model"], num_classes=train_ds.num_classes, in_chans=train_ds.in_chans,
                              **setup["model_kwargs"])
    history = repq.train(model, train_ds, train_cfg, out=str(out_dir / "fp.pt"), progress=progress)
    fused = repq.reparameterize(model, test_ds.normalize(test_ds.images[:2]))
    fp, fz = repq.evaluate(model, test_ds), repq.evaluate(fused, test_ds)
    calib = train_ds.calibration_images(32, seed=0)
    rows: list[dict[str, Any]] = []
    recipes = [(w, g, a, 8, 8, False) for w, g in WEIGHT_RECIPES for a in ACTIVATION_METHODS]
    recipes += [("cfws", "channel", "improved_kl", 8, 8, True)]    # P1's sequential calibration
    recipes += [(w, "channel", a, 4, 8, False) for w in ("minmax", "mse", "cfws")
                for a in ("percentile", "improved_kl", "auto")]
    iterator = recipes
    if progress:
        from tqdm import tqdm
        iterator = tqdm(recipes, desc="PTQ recipes", unit="recipe", leave=False, disable=None)
    for w, g, a, wb, ab, sequential in iterator:
        start = time.perf_counter()
        qmodel = repq.quantize(model, calib, repq.PTQConfig(weight=w, weight_granularity=g, activation=a,
                                                            w_bits=wb, a_bits=ab, sequential=sequential,
                                                            bias_correction=a == "auto"))   # the default: auto + BC
        seconds = time.perf_counter() - start
        top1 = repq.evaluate(qmodel, test_ds)["top1"]
        rows.append(dict(weight=w, granularity=g, activation=a, bits=f"W{wb}A{ab}",
                         calibration="sequential" if sequential else "float inputs", top1=top1,
                         drop=fz["top1"] - top1, seconds=seconds))
        if (w, a, wb, sequential) == ("cfws", "auto", 8, False):   # repq's default
            repq.save_checkpoint(out_dir / "int8_cfws_auto.pt", qmodel)
    table = format_table(["weight", "granularity", "activation", "calibration", "bits", "top-1", "drop", "PTQ s"],
                         [[r["weight"], r["granularity"], r["activation"], r["calibration"], r["bits"], r["top1"],
                           r["drop"], f"{r['seconds']:.1f}"] for r in rows])
    labels = [f"{r['bits']} {r['weight']}/{r['granularity'][0]} + {r['activation']}"
              f"{' (sequential)' if r['calibration'] == 'sequential' else ''}" for r in rows]
    plots = [plot_accuracy_bars(labels, [r["top1"] for r in rows], fz["top1"], out_dir / "ptq_top1.png",
                                f"PTQ on {data} (32 calibration images)")]
    report = analyze(model, calib, out_dir / "analysis", eval_data=_first(test_ds, 300))
    naive = next(r for r in rows if (r["weight"], r["granularity"], r["activation"], r["bits"]) ==
                 ("minmax", "tensor", "minmax", "W8A8"))
    default = next(r for r in rows if (r["weight"], r["activation"], r["bits"], r["calibration"]) ==
                   ("cfws", "auto", "W8A8", "float inputs"))
    header = (f"repq demo on {data}: {setup['model']} {setup['model_kwargs']}, {train_cfg.epochs} epochs "
              f"({history['seconds']:.0f} s)\nFP top-1: train-time {fp['top1']:.2f}, fused {fz['top1']:.2f} "
              f"({fz['n']} test images)\nINT8, naive per-tensor min-max: {naive['top1']:.2f} (drop "
              f"{naive['drop']:.2f}); repq's default (CFWS + auto + bias correction): {default['top1']:.2f} "
              f"(drop {default['drop']:.2f})\n")
    findings = "\n".join(report["findings"][:5]) or "no layer has center taps over 10x its surround"
    human = (header + "\n" + table + "\n\nanalysis (worst layers first):\n" + findings + "\n\nwritten: "
             + ", ".join(str(p) for p in [out_dir / "fp.pt", out_dir / "results.md", *plots])
             + f"\nanalysis report: {out_dir / 'analysis' / 'report.md'}")
    atomic_write_text(out_dir / "results.md", header + "\n```\n" + table + "\n```\n")
    result = {"command": "demo", "data": data, "fp": fp, "fused": fz, "results": rows,
              "naive_int8": naive["top1"], "repq_default_int8": default["top1"],
              "train_seconds": history["seconds"], "files": [str(p) for p in plots] + report["files"],
              "findings": report["findings"]}
    atomic_write_text(out_dir / "results.json", json.dumps(result, indent=2))
    return result, human

"""`repq demo` / `make demo`: train a small RepVGG, fuse it, quantize it with the recipes that tell the story
(naive per-tensor INT8, the per-channel baseline, P1, repq's default; 8 and 4-bit weights), print the table,
write the checkpoints, a markdown table, plots and the analysis report.

Fashion-MNIST: RepVGG-A0 at quarter width, one epoch at lr 0.4 (batch 64, no warmup; about 40 s). The high
learning rate lets a few channels die in the first steps (the ReLU never lets them through again). The identity
branch that reads such a channel sees a running variance of ~0, so its fused center weight gamma / sqrt(var + eps)
reaches hundreds: in the float model it multiplies zeros and does nothing, but it sets the quantization range of
its output channel, and per-tensor min-max INT8 collapses (seed 8: 10.17 % from 86.32; per-channel min-max
41.18 %). This is also the mechanism of the zoo's MobileOne collapse (features.40: running var 2e-10, fused
weight 240); `repq analyze` names such branches. Other seeds
(`repq demo --seed S`, S = 0..4): naive INT8 at 81.25 / 43.69 / 38.64 / 10.02 / 17.57 (FP 84.2-87.6). The demo
says what its own run shows.

Digits (no Fashion-MNIST installed): the same model, 40 epochs on the 8x8 digits at lr 0.2 (batch 64; about 20 s),
the same mechanism: naive INT8 at 57.10 from FP 97.77 (seed 8); seeds 0..4 give 22.56 / 14.21 / 23.96 / 11.14 /
10.86 (FP 95.5-97.2). The zoo (docs/results/ptq.md) shows how often and how badly this happens across models."""
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
from repq.tables import format_table

DEMO_SETUPS = {
    "digits": dict(model="repvgg_a0", model_kwargs=dict(small_input=True, width_scale=0.25),
                   train=dict(epochs=40, batch_size=64, lr=0.2, weight_decay=1e-4, label_smoothing=0.1,
                              augment=False, seed=8)),
    "fashion-mnist": dict(model="repvgg_a0", model_kwargs=dict(small_input=True, width_scale=0.25),
                          train=dict(epochs=1, batch_size=64, lr=0.4, weight_decay=1e-4, label_smoothing=0.1,
                                     augment=False, seed=8)),
}
# The recipes that tell the story (weight method, granularity, activation, w bits, a bits, sequential):
# naive per-tensor INT8, the common per-channel baseline, P1's CFWS + improved KL, repq's default; then 4-bit
# weights. The full grid is `repq ptq --compare`.
STORY = [("minmax", "tensor", "minmax", 8, 8, False, "naive INT8 (per-tensor min-max)"),
         ("minmax", "channel", "percentile", 8, 8, False, "per-channel min-max + percentile"),
         ("cfws", "channel", "improved_kl", 8, 8, True, "P1: CFWS + improved KL (sequential)"),
         ("cfws", "channel", "auto", 8, 8, False, "repq default: equalization + CFWS + auto + bias correction"),
         ("minmax", "channel", "percentile", 4, 8, False, "per-channel min-max + percentile"),
         ("cfws", "channel", "auto", 4, 8, False, "repq default: equalization + CFWS + auto + bias correction")]


def story(rows: list[dict[str, Any]], fp_top1: float) -> str:
    """What this run shows, from its own numbers: naive INT8 failing, or (where it holds) the outliers at 4 bits."""
    naive, channel, default, base4, default4 = rows[0], rows[1], rows[3], rows[4], rows[5]
    text = (f"INT8, naive per-tensor min-max: {naive['top1']:.2f} (drop {naive['drop']:.2f}); per-channel min-max: "
            f"{channel['top1']:.2f}; repq's default (equalization + CFWS + auto + bias correction): "
            f"{default['top1']:.2f} (drop {default['drop']:.2f})")
    if naive["drop"] >= 5.0:
        return text + "\nnaive INT8 fails on this model: the merged kernels' outliers (analysis below)"
    return (text + f"\nnaive INT8 holds on this model (FP {fp_top1:.2f}); its outliers show at 4-bit weights: "
            f"per-channel min-max W4A8 {base4['top1']:.2f}, repq's default W4A8 {default4['top1']:.2f}. The zoo "
            "in docs/results/ptq.md shows models on which naive INT8 itself collapses")


def choose_data(data: str) -> tuple[str, str]:
    """(data name, why): `auto` takes Fashion-MNIST when it is installed, else the bundled digits."""
    from repq.data.datasets import fashion_mnist_dir
    if data != "auto":
        return data, "asked for with --data"
    try:
        return "fashion-mnist", f"found at {fashion_mnist_dir()}"
    except repq.RepqError:
        return "digits", ("Fashion-MNIST is not installed (as root: `make data`, or `apt-get install -y "
                          "dataset-fashion-mnist`); the bundled scikit-learn digits with a recipe on which "
                          "the failure reproduces")


def run_demo(out: str = "runs/demo", data: str = "auto", epochs: int | None = None, seed: int | None = None,
             progress: bool = True) -> tuple[dict[str, Any], str]:
    data, why = choose_data(data)
    if data not in DEMO_SETUPS:
        raise repq.RepqError(f"the demo runs on {' or '.join(DEMO_SETUPS)}, not '{data}'")
    setup = DEMO_SETUPS[data]
    out_dir = Path(out)
    if progress:
        print(f"data: {data} ({why})", flush=True)
    train_ds, test_ds = repq.load_dataset(data, "train"), repq.load_dataset(data, "test")
    overrides = {**({"epochs": epochs} if epochs else {}), **({"seed": seed} if seed is not None else {})}
    train_cfg = repq.TrainConfig(**{**setup["train"], **overrides})
    torch.manual_seed(train_cfg.seed)
    model = repq.create_model(setup["model"], num_classes=train_ds.num_classes, in_chans=train_ds.in_chans,
                              **setup["model_kwargs"])
    history = repq.train(model, train_ds, train_cfg, out=str(out_dir / "fp.pt"), progress=progress)
    fused = repq.reparameterize(model, test_ds.head(2)[0])
    fp, fz = repq.evaluate(model, test_ds), repq.evaluate(fused, test_ds)
    calib = train_ds.calibration_images(32, seed=0)
    rows: list[dict[str, Any]] = []
    iterator = STORY
    if progress:
        from tqdm import tqdm
        iterator = tqdm(STORY, desc="PTQ recipes", unit="recipe", leave=False, disable=None)
    for w, g, a, wb, ab, sequential, name in iterator:
        start = time.perf_counter()
        # repq's default rows take PTQConfig's defaults; the others are the plain recipes as their users run them
        plain = {} if a == "auto" else dict(bias_correction=False, equalize=False, input_activation="minmax")
        qmodel = repq.quantize(model, calib, repq.PTQConfig(weight=w, weight_granularity=g, activation=a,
                                                            w_bits=wb, a_bits=ab, sequential=sequential, **plain))
        seconds = time.perf_counter() - start
        top1 = repq.evaluate(qmodel, test_ds)["top1"]
        rows.append(dict(recipe=name, weight=w, granularity=g, activation=a, bits=f"W{wb}A{ab}",
                         calibration="sequential" if sequential else "float inputs", top1=top1,
                         drop=fz["top1"] - top1, seconds=seconds))
        if (w, a, wb) == ("cfws", "auto", 8):   # repq's default
            repq.save_checkpoint(out_dir / "int8_cfws_auto.pt", qmodel)
    table = format_table(["bits", "recipe", "top-1", "drop", "PTQ s"],
                         [["FP32", "fused float model", fz["top1"], 0.0, ""]]
                         + [[r["bits"], r["recipe"], r["top1"], r["drop"], f"{r['seconds']:.1f}"] for r in rows])
    labels = [f"{r['bits']} {r['recipe']}" for r in rows]
    plots = [plot_accuracy_bars(labels, [r["top1"] for r in rows], fz["top1"], out_dir / "ptq_top1.png",
                                f"PTQ on {data} (32 calibration images)")]
    report = analyze(model, calib, out_dir / "analysis", eval_data=test_ds.head(300))
    naive, default = rows[0], rows[3]
    header = (f"repq demo on {data} ({why}): {setup['model']} {setup['model_kwargs']}, {train_cfg.epochs} "
              f"epoch(s) at lr {train_cfg.lr}, seed {train_cfg.seed} ({history['seconds']:.0f} s)\n"
              f"FP top-1: train-time {fp['top1']:.2f}, fused {fz['top1']:.2f} ({fz['n']} test images)\n"
              f"{story(rows, fz['top1'])}\n")
    findings = "\n".join(report["findings"][:5]) or "no layer has center taps over 10x its surround"
    human = (header + "\n" + table + "\n\nanalysis (worst layers first):\n" + findings + "\n\nwritten: "
             + ", ".join(str(p) for p in [out_dir / "fp.pt", out_dir / "results.md", *plots])
             + f"\nanalysis report: {out_dir / 'analysis' / 'report.md'}")
    atomic_write_text(out_dir / "results.md", header + "\n```\n" + table + "\n```\n")
    result = {"command": "demo", "data": data, "data_reason": why, "model": setup["model"],
              "train": {"epochs": train_cfg.epochs, "lr": train_cfg.lr, "seed": train_cfg.seed},
              "fp": fp, "fused": fz, "results": rows,
              "naive_int8": naive["top1"], "repq_default_int8": default["top1"],
              "train_seconds": history["seconds"], "files": [str(p) for p in plots] + report["files"],
              "findings": report["findings"]}
    atomic_write_text(out_dir / "results.json", json.dumps(result, indent=2))
    return result, human

"""Matplotlib figures (Agg backend, PNG files written atomically)."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from repq.analysis.weights import BranchContribution, LayerWeightStats  # noqa: E402
from repq.io import atomic_write, atomic_write_text  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_center_surround(stats: list[LayerWeightStats], path: str | os.PathLike) -> Path:
    """Per-layer max|w| of the center taps vs the surrounding taps of each fused conv."""
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(stats)), 3.6))
    idx = range(len(stats))
    ax.bar([i - 0.2 for i in idx], [s.center_absmax for s in stats], width=0.4, label="center tap max|w|")
    ax.bar([i + 0.2 for i in idx], [s.surround_absmax for s in stats], width=0.4, label="surround taps max|w|")
    ax.set_xticks(list(idx), [s.name.replace(".rbr_reparam", "") for s in stats], rotation=70, fontsize=7)
    ax.set_ylabel("max |weight|")
    ax.set_title("Fused 3x3 kernels: the merged branches land on the center tap")
    ax.legend()
    return _save(fig, path)


def plot_accuracy_bars(labels: list[str], values: list[float], reference: float, path: str | os.PathLike,
                       title: str) -> Path:
    """Horizontal bars of top-1 per recipe with the float model as a vertical line."""
    fig, ax = plt.subplots(figsize=(7, max(3, 0.28 * len(labels))))
    bars = ax.barh(range(len(labels)), values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=2)
    ax.axvline(reference, color="black", linestyle="--", label=f"float {reference:.2f}")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    low = min(values + [reference])
    ax.set_xlim(max(0.0, low - 5), min(100.0, max(values + [reference]) + 3))   # room for the value labels
    ax.invert_yaxis()
    ax.set_xlabel("top-1 (%)")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)   # outside the bars
    return _save(fig, path)


def _short(name: str) -> str:
    return name.replace(".rbr_reparam", "")


def plot_sqnr(sqnr: dict[str, dict[str, dict[str, float]]], key: str, path: str | os.PathLike, bits: int) -> Path:
    """Per-layer SQNR (dB) of each weight quantizer: `key` is "weight_db" or "output_db"."""
    layers = list(sqnr)
    methods = list(next(iter(sqnr.values())))
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers)), 3.6))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        values = [min(sqnr[layer][method][key], 80.0) for layer in layers]
        ax.bar([j + (i - (len(methods) - 1) / 2) * width for j in range(len(layers))], values, width=width,
               label=method)
    ax.set_xticks(range(len(layers)), [_short(n) for n in layers], rotation=70, fontsize=7)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(f"{'Weight' if key == 'weight_db' else 'Layer output'} SQNR at {bits} bits")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def plot_clipping(clipping: dict[str, dict[float, float]], path: str | os.PathLike, highlight: int = 5) -> Path:
    """Top-1 vs clipping ratio alpha, one line per layer: the `highlight` most sensitive layers (lowest top-1 at
    the tightest clip) in colour and named in a legend outside the plot, the others in light grey."""
    fig, ax = plt.subplots(figsize=(8, 4))
    tightest = {layer: curve[min(curve)] for layer, curve in clipping.items() if curve}
    worst = sorted(tightest, key=tightest.get)[:highlight]
    for layer, curve in clipping.items():
        alphas = sorted(curve)
        if layer in worst:
            ax.plot(alphas, [curve[a] for a in alphas], marker="o", linewidth=1.5, label=_short(layer), zorder=3)
        else:
            ax.plot(alphas, [curve[a] for a in alphas], color="0.8", linewidth=0.8, zorder=1)
    ax.plot([], [], color="0.8", label=f"the other {max(0, len(clipping) - len(worst))} layers")
    ax.set_xlabel("clip at alpha x max of the layer output")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Activation clipping sensitivity (one layer at a time)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="most sensitive")
    return _save(fig, path)


def plot_weight_histogram(fused, layer: str, path: str | os.PathLike, before: torch.Tensor | None = None) -> Path:
    """Histogram of one fused kernel (center taps against surrounding taps, log counts) and, when given, of the
    folded 3x3 branch before the merge."""
    w = fused.get_submodule(layer).weight.detach()
    c = w.shape[-1] // 2
    center = w[:, :, c, c].flatten()
    mask = torch.ones(w.shape[-2:], dtype=torch.bool)
    mask[c, c] = False
    surround = w[:, :, mask].flatten()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    top = float(w.abs().max())
    ax.hist(surround.numpy(), bins=120, range=(-top, top), alpha=0.7, label="surround taps", log=True)
    ax.hist(center.numpy(), bins=120, range=(-top, top), alpha=0.7, label="center taps", log=True)
    if before is not None:
        ax.hist(before.flatten().numpy(), bins=120, range=(-top, top), histtype="step", color="black",
                label="3x3 branch before the merge", log=True)
    ax.set_xlabel("weight value")
    ax.set_title(f"Fused kernel of {_short(layer)}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # outside: the tails are the data
    return _save(fig, path)


def write_report(out_dir: Path, fused, stats: list[LayerWeightStats], contributions: list[BranchContribution],
                 sqnr: dict, clipping: dict, findings: list[str], bits: int, worst: str | None = None,
                 before_merge: torch.Tensor | None = None) -> list[Path]:
    """report.md with tables and the PNG plots it links to (the histogram is of the `worst` layer, with its 3x3
    branch `before_merge` when known); returns every file written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [plot_center_surround(stats, out_dir / "center_vs_surround.png"),
             plot_sqnr(sqnr, "weight_db", out_dir / "weight_sqnr.png", bits),
             plot_sqnr(sqnr, "output_db", out_dir / "output_sqnr.png", bits)]
    if worst:
        files.append(plot_weight_histogram(fused, worst, out_dir / "worst_layer_histogram.png", before_merge))
    if clipping:
        files.append(plot_clipping(clipping, out_dir / "clipping.png"))
    methods = list(next(iter(sqnr.values())))
    by_layer = {c.layer: c for c in contributions}
    lines = ["# repq analysis", "", "## Findings", ""]
    lines += [f"- {f}" for f in findings] or ["- no layer has center taps over "
                                               "10x its surround: min-max per-channel scales are safe"]
    lines += ["", "## Fused convs", "",
              "| layer | center max | surround max | center/surround | channel max/median | kurtosis | "
              "dominant branch | identity BN scale |", "|---|---|---|---|---|---|---|---|"]
    for s in stats:
        c = by_layer.get(s.name)
        lines.append(f"| {s.name} | {s.center_absmax:.4g} | {s.surround_absmax:.4g} | {s.ratio:.1f} | "
                     f"{s.channel_max_ratio:.1f} | {s.kurtosis:.1f} | {c.dominant if c else '-'} | "
                     f"{(f'{c.identity:.3g}' if c else '-')} |")
    lines += ["", f"## SQNR at {bits} bits (dB; weight / layer output on the calibration images)", "",
              "| layer | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for layer, per_method in sqnr.items():
        cells = [f"{per_method[m]['weight_db']:.1f} / {per_method[m]['output_db']:.1f}" for m in methods]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    if clipping:
        alphas = sorted(next(iter(clipping.values())))
        lines += ["", "## Clipping sensitivity (top-1 with one layer's output clipped at alpha x max)", "",
                  "| layer | " + " | ".join(f"alpha {a}" for a in alphas) + " |", "|---|" + "---|" * len(alphas)]
        lines += [f"| {layer} | " + " | ".join(f"{curve[a]:.2f}" for a in alphas) + " |"
                  for layer, curve in clipping.items()]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in files]
    return [atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n"), *files]

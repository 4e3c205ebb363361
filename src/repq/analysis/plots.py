"""Matplotlib figures (Agg backend, PNG files written atomically)."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from repq.analysis.weights import LayerWeightStats  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


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
    ax.barh(range(len(labels)), values, color="tab:blue")
    ax.axvline(reference, color="black", linestyle="--", label=f"float {reference:.2f}")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    low = min(values + [reference])
    ax.set_xlim(max(0.0, low - 5), min(100.0, max(values + [reference]) + 1))
    ax.invert_yaxis()
    ax.set_xlabel("top-1 (%)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save(fig, path)

"""`repq analyze`: per-layer diagnostics of a re-parameterized model, as a markdown report with PNG plots.

For each fused conv: weight statistics (center vs surround, channel spread, kurtosis), which original branch put
the large values on the center taps, the SQNR of the weights and of the layer output under each weight quantizer,
and, with evaluation data, the accuracy when that layer's output is clipped at alpha x its max (as in P1).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from repq.analysis.weights import BranchContribution, branch_contributions, center_surround_stats
from repq.evaluation import evaluate
from repq.quant.weights import quantize_weight
from repq.reparam.model import reparameterize

WEIGHT_QUANTIZERS = {"minmax/tensor": ("minmax", False), "minmax/channel": ("minmax", True),
                     "mse/channel": ("mse", True), "cfws": ("cfws", True)}
OUTLIER_RATIO = 10.0  # center taps this many times the surround flag a layer


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2); inf for an exact approximation."""
    noise = float((reference.double() - approx.double()).pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


@torch.no_grad()
def _conv_inputs(fused: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs, hooks = {}, []
    for name, m in fused.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=name: inputs.__setitem__(n, a[0])))
    try:
        fused(images)
    finally:
        for h in hooks:
            h.remove()
    return inputs


@torch.no_grad()
def quantizer_sqnr(fused: nn.Module, images: torch.Tensor, bits: int = 8) -> dict[str, dict[str, dict[str, float]]]:
    """{layer: {quantizer: {"weight_db", "output_db"}}}: weight SQNR and conv-output SQNR on `images` (float
    inputs, so only the weight error is measured)."""
    inputs = _conv_inputs(fused, images)
    result = {}
    for name, conv in fused.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        w = conv.weight.detach()
        ref_out = F.conv2d(inputs[name], w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        result[name] = {}
        for label, (method, per_channel) in WEIGHT_QUANTIZERS.items():
            wq = quantize_weight(w, method, bits, per_channel, conv.groups).dequantize()
            out = F.conv2d(inputs[name], wq, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            result[name][label] = {"weight_db": sqnr_db(w, wq), "output_db": sqnr_db(ref_out, out)}
    return result


@torch.no_grad()
def clipping_sensitivity(fused: nn.Module, images: torch.Tensor, eval_data: Any,
                         alphas: tuple[float, ...] = (0.25, 0.5, 0.75), progress: bool = False
                         ) -> dict[str, dict[float, float]]:
    """Top-1 when one conv's output is clipped at alpha x (its max on `images`), all else float."""
    maxima = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=name: maxima.__setitem__(n, float(out.max())))
             for name, m in fused.named_modules() if isinstance(m, nn.Conv2d)]
    fused(images)
    for h in hooks:
        h.remove()
    curves: dict[str, dict[float, float]] = {}
    convs = [(n, m) for n, m in fused.named_modules() if isinstance(m, nn.Conv2d)]
    if progress:
        from tqdm import tqdm
        convs = tqdm(convs, desc="clipping sensitivity", unit="layer", leave=False, disable=None)
    for name, conv in convs:
        curves[name] = {}
        for alpha in alphas:
            limit = alpha * maxima[name]
            handle = conv.register_forward_hook(lambda mod, a, out, lim=limit: out.clamp(max=lim))
            try:
                curves[name][alpha] = evaluate(fused, eval_data)["top1"]
            finally:
                handle.remove()
    return curves


def diagnose(stats, contributions: list[BranchContribution]) -> list[str]:
    """One line per layer whose center taps dominate, naming the branch (and BN scale) that caused it."""
    by_layer = {c.layer: c for c in contributions}
    lines = []
    for s in sorted(stats, key=lambda s: -s.ratio):
        if s.ratio < OUTLIER_RATIO:
            continue
        line = f"{s.name}: center taps {s.ratio:.1f}x the surround"
        c = by_layer.get(s.name)
        if c is not None:
            line += (f"; cause: {c.dominant} branch (center contributions 3x3 {c.dense_center:.3g}, "
                     f"1x1 {c.one_by_one:.3g}, identity BN scale {c.identity:.3g})")
            if c.dominant != "3x3" and c.constant_inputs:
                line += (f"; {c.constant_inputs} input channel(s) were constant in training (BN running variance "
                         "below its eps, e.g. a channel the ReLU never lets through): their weight multiplies a "
                         "constant, yet sets the quantization range")
        lines.append(line)
    return lines


def analyze(model: nn.Module, images: torch.Tensor, out_dir: str | Path | None = None, eval_data: Any = None,
            bits: int = 8, alphas: tuple[float, ...] = (0.25, 0.5, 0.75), progress: bool = False) -> dict[str, Any]:
    """Diagnose `model` (training-time or fused) on calibration `images`; write report.md + plots to `out_dir`."""
    model = model.eval()
    contributions = branch_contributions(model)
    fused = reparameterize(model, images[:2])
    stats = center_surround_stats(fused)
    sqnr = quantizer_sqnr(fused, images, bits)
    clipping = clipping_sensitivity(fused, images, eval_data, alphas, progress) if eval_data is not None else {}
    result = {"layers": [s.as_dict() for s in stats],
              "branches": [{**c.__dict__, "dominant": c.dominant} for c in contributions],
              "sqnr": sqnr, "clipping": {k: {str(a): v for a, v in d.items()} for k, d in clipping.items()},
              "findings": diagnose(stats, contributions)}
    if out_dir is not None:
        from repq.analysis.plots import write_report
        from repq.models.blocks import RepVGGBlock
        worst = max(stats, key=lambda s: s.ratio).name if stats else None
        block = dict(model.named_modules()).get(worst.removesuffix(".rbr_reparam")) if worst else None
        before = block.rbr_dense.folded()[0].detach() if isinstance(block, RepVGGBlock) else None
        result["files"] = [str(p) for p in write_report(Path(out_dir), fused, stats, contributions, sqnr, clipping,
                                                           result["findings"], bits, worst, before)]
    return result

"""Per-layer quantization sensitivity: quantize one layer at a time and measure the task metric, as YOLOv6's
partial-quantization tools do before keeping the most sensitive layers in float for TensorRT."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from repq.quant.modules import QUANT_LAYERS
from repq.quant.selection import FloatMode


def layer_sensitivity(qmodel: nn.Module, metric: Callable[[nn.Module], float], progress: bool = False
                      ) -> tuple[float, list[dict[str, Any]]]:
    """(the float metric, rows) for a quantized model: each row is a quantized layer with the metric when only that
    layer (its weights and its input) is quantized, and `loss` = float metric - that; sorted most sensitive first.
    `metric` maps a model to a number where higher is better (top-1, mAP)."""
    layers = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)]
    with FloatMode(qmodel):
        baseline = metric(qmodel)
    items = layers
    if progress:
        from tqdm import tqdm
        items = tqdm(layers, desc="sensitivity", unit="layer", leave=False, disable=None)
    rows = []
    for name, layer in items:
        with FloatMode(qmodel):
            layer.input_quantizer.mode = "quant"
            layer.use_float_weight = False
            value = metric(qmodel)
        rows.append({"layer": name, "metric": value, "loss": baseline - value})
    rows.sort(key=lambda r: -r["loss"])
    return baseline, rows

"""Empirical bias correction (per output channel, from the calibration images).

Why: rounding weights and clipping activations shift each layer's output mean, and the shift accumulates through a
deep plain network. The correction measures, layer by layer in execution order, the per-channel mean of the float
network's output and of the quantized network's (whose earlier layers are already corrected), and adds the
difference to the bias (which stays on the layer's integer bias grid).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from repq.quant.modules import UNIFORM_LAYERS
from repq.quant.selection import FloatMode


def _channel_mean(out: Tensor) -> Tensor:
    dims = [d for d in range(out.dim()) if d != 1]
    return out.mean(dim=dims)


@torch.no_grad()
def correct_bias(model: nn.Module, images: Tensor) -> dict[str, float]:
    """Correct the bias of every uniform quantized layer of `model` in place; returns name -> largest |shift| (in
    units of the layer's output). One float forward and one quantized forward over all `images` at once: the
    quantized forward applies each correction before the next layer runs. Layers without a bias are left as they
    are (not in the returned mapping)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, UNIFORM_LAYERS) and m.bias is not None}
    float_means: dict[str, Tensor] = {}

    def record(name):
        def hook(layer, args, output):
            float_means[name] = _channel_mean(output)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    try:
        with FloatMode(model):
            model(images)
    finally:
        for h in handles:
            h.remove()
    shifts: dict[str, float] = {}

    def correct(name):
        def hook(layer, args, output):
            delta = float_means[name] - _channel_mean(output)
            before = layer.effective_bias().clone()
            layer.bias.add_(delta)
            applied = layer.effective_bias() - before          # what the integer bias grid kept of it
            shifts[name] = float(applied.abs().max())
            shape = [1] * output.dim()
            shape[1] = -1
            return output + applied.reshape(shape)
        return hook

    handles = [m.register_forward_hook(correct(n)) for n, m in layers.items()]
    try:
        model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return shifts

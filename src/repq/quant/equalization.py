"""Per-channel activation equalization before PTQ (`PTQConfig.equalize`, on by default; methods.md section 3).

Why: activations are quantized per tensor, so every channel of a tensor shares the grid set by its largest
channel; a channel whose values stay far below it gets a few levels (on a zoo model, W6A6 collapsed to chance on
one calibration seed for this reason). A positive per-channel scale commutes with ReLU / LeakyReLU and with max and
average pooling, so a fused conv -> ReLU -> conv pair computes the same function when output channel c of the first
conv (weights and bias) is multiplied by s_c and input channel c of the second is divided by s_c: cross-layer
equalization (Nagel et al. 2019, DFQ), applied to activations as in SmoothQuant (Xiao et al. 2023).

The trade: the producer's per-channel weight grids are unchanged (each output channel scales with its own grid);
the consumer's column c shrinks (its weights lose relative precision) while channel c of its input gains grid
levels. repq takes the s_c that minimizes the consumer's expected output noise under a uniform rounding model,

    activation noise:  sum_{o,t} W[o,c,t]^2 * P(x_c != 0) * step_x^2 / 12 / s_c^2
    weight noise:      sum_{o,t} e[o,c,t]^2 * E[x_c^2] * s_c^2

(W the consumer's weights, e their rounding error under the configured weight quantizer and width, step_x the
tensor's activation step at its width): s_c = (activation coefficient / weight coefficient)^(1/4), clamped to
[1, a_max / a_c] so that no channel outgrows the tensor's largest one (the tensor's range, and so its step, stay as
they were). The widths enter through step_x and e: at W4A8 it scales little, at W8A4 much. Only channels whose
every use is such a consumer are scaled; anything else (a residual add, a concat, an output, an SE gate) leaves
the pair alone.

Depthwise consumers get the same bound. Their weight grid is per output channel = per input channel, so it scales
with the column and, in this model, their weight noise would not grow with s_c at all: the balance would always
run to the ceiling. With 32 calibration images a channel's maximum is a noisy estimate (a deep layer at 1x1 or 2x2
sees 32-128 values per channel), and a channel scaled until that maximum meets the tensor's range keeps no headroom:
on a zoo MobileOne, 0.2-3 % of the test values of most layers then lay above the calibration range and W8A8 lost
0.73 pt on one seed instead of 0. Bounding them as if their grid stayed put leaves headroom in proportion to their
weights' rounding error (measured: worst seed 0.12). Judging each pair's strength held out by its consumer's squared
error was tried and dropped: that error is dominated by the few huge values a held-out half clips, which the network
tolerates, so it refused the equalization that took a zoo model's W6A6 drop from 13.7 to 0.1 pt.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from repq.errors import RepqError
from repq.quant.weights import quantize_weight

_LAYERS = (nn.Conv2d, nn.Linear)
# Ops through which a positive per-channel scale passes unchanged (f(s x) = s f(x), channel by channel).
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                          F.adaptive_max_pool2d, F.dropout)
_HOMOGENEOUS_METHODS = ("relu",)
# Shape ops that keep channel c at index c when the spatial size is 1x1 (the global pool -> classifier step), and
# spatial means (linear, channel by channel).
_RESHAPE_FUNCTIONS = (torch.flatten,)
_RESHAPE_METHODS = ("view", "reshape", "flatten", "squeeze")


@dataclass
class Pair:
    """A producer layer whose output reaches only `consumers` (by their first argument), through homogeneous ops."""

    producer: str
    consumers: list[str]
    scale: Tensor | None = None


@dataclass
class EqualizationRecord:
    pairs: dict[str, dict[str, Any]] = field(default_factory=dict)   # producer -> consumers, largest / median scale
    skipped: str | None = None                                      # why nothing was equalized, if so

    def as_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "skipped": self.skipped}


def _trace(model: nn.Module, example: Tensor) -> tuple[torch.fx.Graph, dict[str, nn.Module]]:
    graph = torch.fx.Tracer().trace(model)
    from torch.fx.passes.shape_prop import ShapeProp
    with torch.no_grad():
        ShapeProp(torch.fx.GraphModule(model, graph)).propagate(example)
    return graph, dict(model.named_modules())


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _keeps_channels(node: torch.fx.Node, source: torch.fx.Node, spatial_mean: bool = False) -> bool:
    """A reshape that maps (N, C, 1, ...) to (N, C), or (`spatial_mean`) a mean over the spatial dimensions only:
    channel c stays channel c."""
    before, after = _shape(source), _shape(node)
    if before is None or after is None or len(before) < 2 or len(after) < 2 or before[:2] != after[:2]:
        return False
    if spatial_mean:
        return all(d == 1 for d in after[2:])
    return len(after) == 2 and all(d == 1 for d in before[2:])


def _passes_scale(node: torch.fx.Node, source: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `node`, reading `source` as its first argument, passes a per-channel scale through unchanged."""
    if not node.args or node.args[0] is not source:
        return False
    if node.op == "call_module":
        return isinstance(modules[node.target], _HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        if node.target in _HOMOGENEOUS_FUNCTIONS:
            return True
        return node.target in _RESHAPE_FUNCTIONS and _keeps_channels(node, source)
    if node.op == "call_method":
        if node.target in _HOMOGENEOUS_METHODS:
            return True
        if node.target == "mean":
            return _keeps_channels(node, source, spatial_mean=True)
        return node.target in _RESHAPE_METHODS and _keeps_channels(node, source)
    return False


def _is_size_query(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    """x.size(...) / x.shape / x.dim(): reads the shape only, never the values."""
    return (node.op == "call_method" and node.target in ("size", "dim") and node.args[0] is source) or (
        node.op == "call_function" and node.target is getattr and node.args[0] is source
        and node.args[1] in ("shape", "ndim"))


def find_pairs(model: nn.Module, example: Tensor) -> list[Pair]:
    """Every Conv2d/Linear of `model` whose output channels may be scaled: all its uses lead, through homogeneous
    per-channel ops, into Conv2d/Linear layers as their input (and into nothing else)."""
    graph, modules = _trace(model, example)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _LAYERS):
            continue
        consumers: list[str] = []
        frontier, ok = [node], True
        while frontier and ok:
            current = frontier.pop()
            for user in current.users:
                if _is_size_query(user, current):
                    continue
                if user.op == "call_module" and isinstance(modules[user.target], _LAYERS) \
                        and user.args and user.args[0] is current and len(user.args) == 1 and not user.kwargs:
                    consumers.append(user.target)
                elif _passes_scale(user, current, modules):
                    frontier.append(user)
                else:
                    ok = False
                    break
        if ok and consumers:
            pairs.append(Pair(node.target, sorted(set(consumers))))
    return pairs


def _columns(weight: Tensor, groups: int) -> Tensor:
    """(input channels, entries): the weights of a conv/linear that read each input channel, one row each."""
    if weight.dim() == 2:
        return weight.t()
    out_ch, per_group = weight.shape[:2]
    outs = out_ch // groups
    return torch.cat([weight[g * outs:(g + 1) * outs].transpose(0, 1).reshape(per_group, -1)
                      for g in range(groups)])


def _scale_columns(layer: nn.Module, scale: Tensor) -> None:
    """Divide the weights that read input channel c by scale[c]."""
    w = layer.weight.data
    if w.dim() == 2:
        w.div_(scale.reshape(1, -1))
        return
    groups = layer.groups
    per_group, outs = layer.in_channels // groups, layer.out_channels // groups
    for g in range(groups):
        w[g * outs:(g + 1) * outs].div_(scale[g * per_group:(g + 1) * per_group].reshape(1, -1, 1, 1))


def _scale_rows(layer: nn.Module, scale: Tensor) -> None:
    layer.weight.data.mul_(scale.reshape(-1, *[1] * (layer.weight.dim() - 1)))
    if layer.bias is not None:
        layer.bias.data.mul_(scale)


class _ChannelStats:
    """Per input channel of one tensor, over the calibration images: max |x|, share of non-zeros, mean of x^2."""

    def __init__(self) -> None:
        self.amax: Tensor | None = None
        self.nonzero = self.square = None
        self.count = 0
        self.nonnegative = True

    def update(self, x: Tensor) -> None:
        x = x.detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.numel() // x.shape[1]
        amax, nonzero, square = x.abs().amax(dim=dims), (x != 0).double().sum(dim=dims), (x * x).sum(dim=dims)
        if self.amax is None:
            self.amax, self.nonzero, self.square = amax, nonzero, square
        else:
            self.amax = torch.maximum(self.amax, amax)
            self.nonzero, self.square = self.nonzero + nonzero, self.square + square
        self.count += n
        self.nonnegative = self.nonnegative and bool((x >= 0).all())


@torch.no_grad()
def channel_scales(stats: _ChannelStats, consumers: list[nn.Module], widths: list[tuple[int, int]], weight: str,
                   unsigned: bool) -> Tensor:
    """The noise-balanced scale of every channel (module docstring) for one tensor read by `consumers`, each at its
    (weight bits, activation bits), with the `weight` quantizer (per output channel)."""
    amax = stats.amax
    top = amax.max()
    if top <= 0:
        return torch.ones_like(amax)
    share, mean_square = stats.nonzero / stats.count, stats.square / stats.count
    activation_term = torch.zeros_like(amax)
    weight_term = torch.zeros_like(amax)
    for layer, (w_bits, a_bits) in zip(consumers, widths):
        groups = getattr(layer, "groups", 1)
        levels = 2 ** a_bits - 1 if unsigned and stats.nonnegative else 2 ** (a_bits - 1) - 1
        step = top / levels
        w = layer.weight.detach()
        activation_term += _columns(w.double() ** 2, groups).sum(1) * share * step ** 2 / 12
        error = quantize_weight(w, weight, w_bits, True, groups).dequantize() - w
        weight_term += _columns(error.double() ** 2, groups).sum(1) * mean_square
    ceiling = torch.where(amax > 0, top / amax.clamp_min(1e-300), torch.ones_like(amax))
    balanced = torch.where(weight_term > 0, (activation_term / weight_term.clamp_min(1e-300)) ** 0.25, ceiling)
    return torch.minimum(balanced.clamp_min(1.0), ceiling)


@torch.no_grad()
def _outputs(model: nn.Module, images: Tensor, batch_size: int) -> list[Tensor]:
    from repq.quant.selection import _flat_outputs, chunks
    return [_flat_outputs(model(batch)).double() for batch in chunks(images, batch_size)]


@torch.no_grad()
def equalize_activations(model: nn.Module, images: Tensor, widths: dict[str, tuple[int, int]], weight: str,
                         unsigned: bool, skip: set[str] = frozenset(), batch_size: int = 32) -> EqualizationRecord:
    """Equalize, in place, every scalable pair of the fused float `model` (see the module docstring) from the
    calibration `images`; `widths` gives each quantized layer's (weight bits, activation bits), `skip` the layers
    kept in float (a pair whose consumer stays in float gains nothing and is left alone). The network output is
    checked against the model before the change."""
    record = EqualizationRecord()
    model.eval()
    try:
        pairs = find_pairs(model, images[:1])
    except Exception as exc:  # noqa: BLE001 - fx raises many types for dynamic control flow
        record.skipped = f"the model cannot be traced ({type(exc).__name__})"
        return record
    pairs = [p for p in pairs if all(c in widths and c not in skip for c in p.consumers)]
    if not pairs:
        record.skipped = "no conv whose output reaches only convs / linears through ReLU or pooling"
        return record
    modules = dict(model.named_modules())
    stats = {p.producer: _ChannelStats() for p in pairs}
    hooks = [modules[p.consumers[0]].register_forward_pre_hook(
        lambda m, args, s=stats[p.producer]: s.update(args[0])) for p in pairs]
    try:
        before = _outputs(model, images, batch_size)
    finally:
        for h in hooks:
            h.remove()
    for p in pairs:
        consumers = [modules[c] for c in p.consumers]
        p.scale = channel_scales(stats[p.producer], consumers, [widths[c] for c in p.consumers], weight, unsigned)
        _scale_rows(modules[p.producer], p.scale.to(modules[p.producer].weight.dtype))
        for layer in consumers:
            _scale_columns(layer, p.scale.to(layer.weight.dtype))
        record.pairs[p.producer] = {"consumers": p.consumers, "max_scale": float(p.scale.max()),
                                    "median_scale": float(p.scale.median()),
                                    "scaled_channels": int((p.scale > 1).sum()), "channels": len(p.scale)}
    after = _outputs(model, images, batch_size)
    reference = max(float(b.abs().max()) for b in before) or 1.0
    diff = max(float((a - b).abs().max()) for a, b in zip(after, before)) / reference
    if diff > 1e-4:
        raise RepqError(f"activation equalization changed the float network output by {diff:.2e} of its range "
                        "(a repq bug); quantize with equalize=False and report it")
    return record

"""Loss-aware choice of activation ranges (`activation="auto"`, methods.md section 3).

Why: no single calibrator is right for every tensor. Min-max wastes levels on outliers that do not matter, KL-style
methods clip outliers that do (on models repq did not train, the improved KL chose 3-15 % of a layer's range and
collapsed the network). What matters is the effect on what the activation feeds, so each activation gets the
candidate threshold that best reconstructs its consumer's output (after that consumer's activation function), all
from float inputs. A global guard then compares the network output with a plain baseline (per-channel min-max
weights + percentile activations) and falls back layer by layer where the choice did worse.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from repq.errors import RepqError
from repq.quant.calibrators import CalibrationConfig, HistogramObserver
from repq.quant.modules import QUANT_LAYERS, ActQuantizer

# Candidate label -> (method, percentile). Every single-tensor calibrator of methods.md section 3.
CANDIDATES: dict[str, tuple[str, float | None]] = {
    "minmax": ("minmax", None), "p99.9": ("percentile", 99.9), "p99.99": ("percentile", 99.99),
    "p99.999": ("percentile", 99.999), "mse": ("mse", None), "kl": ("kl", None), "improved_kl": ("improved_kl", None),
}
BASELINE_CANDIDATE = "p99.99"   # the guard's baseline activations (percentile 99.99, as PTQConfig.percentile)
# Element-wise activations that may follow a consumer layer; its output is scored after them.
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.GELU, nn.Sigmoid, nn.Mish)


@dataclass
class Choice:
    """What `auto` decided for one activation quantizer (reported per layer by `repq ptq`)."""

    name: str
    signed: bool
    candidates: dict[str, float]                       # label -> amax
    baseline: float = 0.0                              # the guard's baseline range (BASELINE_CANDIDATE)
    errors: dict[str, float] = field(default_factory=dict)   # label -> consumer reconstruction error (MSE)
    chosen: str = ""
    guard_fallback: bool = False

    @property
    def amax(self) -> float:
        return self.candidates[self.chosen]

    def as_dict(self) -> dict:
        return {"method": self.chosen, "amax": self.amax, "signed": self.signed, "guard_fallback": self.guard_fallback,
                "candidates": self.candidates, "errors": self.errors}


def chunks(images: Tensor, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]


def _consumers(model: nn.Module) -> list[nn.Module]:
    """The modules that own an input quantizer (quantized layers, quantized pools)."""
    return [m for m in model.modules() if isinstance(getattr(m, "input_quantizer", None), ActQuantizer)]


class _FloatMode:
    """Context: quantizers off and float weights, so a forward is the float network."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        for m in self.model.modules():
            if isinstance(m, ActQuantizer):
                m.mode = "off"
            if isinstance(m, QUANT_LAYERS):
                m.use_float_weight = True
        return self

    def __exit__(self, *exc):
        for m in self.model.modules():
            if isinstance(m, ActQuantizer):
                m.mode = "quant"
            if isinstance(m, QUANT_LAYERS):
                m.use_float_weight = False


@torch.no_grad()
def observe(model: nn.Module, images: Tensor, batch_size: int, bins: int
            ) -> tuple[list[ActQuantizer], dict[ActQuantizer, HistogramObserver], dict[nn.Module, nn.Module]]:
    """One float pass: histograms of every quantizer's input (accumulated over batches), the execution order of the
    quantizers, and for each consumer layer the element-wise activation module applied to its output, if any."""
    order: list[ActQuantizer] = []
    observers: dict[ActQuantizer, HistogramObserver] = {}
    produced: dict[int, nn.Module] = {}
    activation_of: dict[nn.Module, nn.Module] = {}

    def observe_hook(q: ActQuantizer, args):
        if not torch.isfinite(args[0]).all():
            raise RepqError(f"NaN/Inf activations at the input of '{q.name}' during calibration; "
                            "check the model weights and the calibration images")
        if q not in observers:
            observers[q] = HistogramObserver(bins)
            order.append(q)
        observers[q].update(args[0])

    def output_hook(layer, args, output):
        if isinstance(output, Tensor):
            produced[id(output)] = layer

    def activation_hook(act, args):
        layer = produced.get(id(args[0])) if args and isinstance(args[0], Tensor) else None
        if layer is not None:
            activation_of.setdefault(layer, act)

    handles = [q.register_forward_pre_hook(observe_hook) for q in model.modules() if isinstance(q, ActQuantizer)]
    handles += [m.register_forward_hook(output_hook) for m in _consumers(model)]
    handles += [m.register_forward_pre_hook(activation_hook) for m in model.modules() if isinstance(m, _ACTIVATIONS)]
    try:
        with _FloatMode(model):
            for batch in chunks(images, batch_size):
                produced.clear()
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return order, observers, activation_of


def check_all_ran(quantizers: list[ActQuantizer], order: list[ActQuantizer]) -> None:
    missed = [q.name for q in quantizers if q not in order]
    if missed:
        raise RepqError(f"layers never ran during calibration: {', '.join(missed)}; repq needs every layer used")


def candidate_ranges(observer: HistogramObserver, base: CalibrationConfig, labels: list[str]) -> dict[str, float]:
    out = {}
    for label in labels:
        method, pct = CANDIDATES[label]
        cfg = replace(base, method=method, percentile=pct if pct is not None else base.percentile)
        out[label] = observer.amax(cfg)
    return out


@torch.no_grad()
def score_candidates(model: nn.Module, images: Tensor, batch_size: int, choices: dict[ActQuantizer, Choice],
                     activation_of: dict[nn.Module, nn.Module]) -> None:
    """Fill each choice's `errors`: the mean squared error of its consumer's output (after the consumer's
    activation) with the input quantized at each candidate range and the weights quantized, against the float
    layer on the float input, over the calibration images (one float pass; each consumer re-run per candidate)."""
    owner = {m.input_quantizer: m for m in _consumers(model)}
    sums: dict[ActQuantizer, dict[str, float]] = {q: dict.fromkeys(c.candidates, 0.0) for q, c in choices.items()}
    counts: dict[ActQuantizer, int] = dict.fromkeys(choices, 0)

    def score_hook(layer, args, output):
        q = layer.input_quantizer
        if q not in choices or not isinstance(output, Tensor):
            return
        act: Callable[[Tensor], Tensor] = activation_of.get(layer, nn.Identity())
        reference = act(output)
        x = args[0]
        float_weight = getattr(layer, "use_float_weight", None)
        if float_weight is not None:
            layer.use_float_weight = False
        q.mode = "quant"
        try:
            tried: dict[float, float] = {}
            for label, amax in choices[q].candidates.items():
                if amax not in tried:       # equal thresholds give equal errors
                    q.set_range(amax, choices[q].signed)
                    tried[amax] = float(((act(layer.forward(x)) - reference) ** 2).sum())
                sums[q][label] += tried[amax]
        finally:
            q.mode = "off"
            if float_weight is not None:
                layer.use_float_weight = True
        counts[q] += reference.numel()

    handles = [m.register_forward_hook(score_hook) for m in owner.values() if m.input_quantizer in choices]
    try:
        with _FloatMode(model):
            for batch in chunks(images, batch_size):
                model(batch)
    finally:
        for h in handles:
            h.remove()
    for q, choice in choices.items():
        n = max(1, counts[q])
        choice.errors = {label: total / n for label, total in sums[q].items()}


def pick(choice: Choice) -> str:
    """The candidate with the lowest error; among equal errors (relative 1e-9) the larger threshold."""
    best = min(choice.errors.values())
    tied = [label for label, e in choice.errors.items() if e <= best * (1 + 1e-9) + 1e-30]
    return max(tied, key=lambda label: choice.candidates[label])


def _flat_outputs(out) -> Tensor:
    if isinstance(out, Tensor):
        return out.flatten(1) if out.dim() > 1 else out.reshape(len(out), -1)
    if isinstance(out, dict):
        out = list(out.values())
    return torch.cat([_flat_outputs(o) for o in out], dim=1)


@torch.no_grad()
def output_error(model: nn.Module, images: Tensor, batch_size: int, reference: list[Tensor]) -> float:
    """Mean squared difference of the quantized network's outputs from the float outputs."""
    total, n = 0.0, 0
    for batch, ref in zip(chunks(images, batch_size), reference):
        out = _flat_outputs(model(batch))
        total += float(((out - ref) ** 2).sum())
        n += ref.numel()
    return total / max(1, n)


@torch.no_grad()
def float_outputs(model: nn.Module, images: Tensor, batch_size: int) -> list[Tensor]:
    with _FloatMode(model):
        return [_flat_outputs(model(batch)) for batch in chunks(images, batch_size)]


def apply(quantizers: dict[str, ActQuantizer], ranges: dict[str, tuple[float, bool]]) -> None:
    for name, (amax, signed) in ranges.items():
        quantizers[name].set_range(amax, signed)


@torch.no_grad()
def guard(model: nn.Module, baseline: nn.Module, images: Tensor, batch_size: int, choices: dict[str, Choice]
          ) -> dict:
    """Compare the network output error of the chosen ranges with the baseline model's; where worse, move layers
    one at a time (execution order) to the baseline's percentile range, keeping each move that lowers the error,
    until the error is no worse than the baseline's. Returns what it measured and did."""
    reference = float_outputs(model, images, batch_size)
    quantizers = {q.name: q for q in model.modules() if isinstance(q, ActQuantizer)}
    base_error = output_error(baseline, images, batch_size, reference)
    error = first_error = output_error(model, images, batch_size, reference)
    fallbacks: list[str] = []
    if error > base_error:
        for name, choice in choices.items():
            if error <= base_error:
                break
            if choice.baseline == choice.amax:
                continue
            quantizers[name].set_range(choice.baseline, choice.signed)
            trial = output_error(model, images, batch_size, reference)
            if trial < error:
                error = trial
                choice.candidates[BASELINE_CANDIDATE] = choice.baseline
                choice.chosen, choice.guard_fallback = BASELINE_CANDIDATE, True
                fallbacks.append(name)
            else:
                quantizers[name].set_range(choice.amax, choice.signed)
    return {"baseline_error": base_error, "auto_error": first_error, "final_error": error, "fallbacks": fallbacks,
            "worse_than_baseline": error > base_error}


@torch.no_grad()
def select_ranges(model: nn.Module, images: Tensor, base: CalibrationConfig, input_cfg: CalibrationConfig,
                  allow_unsigned: bool, batch_size: int, labels: list[str],
                  baseline_builder: Callable[[], nn.Module] | None) -> tuple[dict[str, Choice], dict | None]:
    """Set every activation quantizer of the quantized `model` by the `auto` rule; return the per-layer choices and
    the guard's record (None without a baseline). The network input keeps `input_cfg` (P1: max-abs)."""
    order, observers, activation_of = observe(model, images, batch_size, base.bins)
    check_all_ran([q for q in model.modules() if isinstance(q, ActQuantizer)], order)
    choices: dict[ActQuantizer, Choice] = {}
    for i, q in enumerate(order):
        obs = observers[q]
        signed = not (allow_unsigned and obs.nonnegative)
        cfg = replace(base, bits=q.bits, signed=signed)
        if i == 0:   # the network input: one fixed method
            amax = obs.amax(replace(input_cfg, bits=q.bits, signed=signed))
            q.set_range(amax, signed)
            continue
        choices[q] = Choice(q.name, signed, candidate_ranges(obs, cfg, labels),
                            baseline=candidate_ranges(obs, cfg, [BASELINE_CANDIDATE])[BASELINE_CANDIDATE])
    score_candidates(model, images, batch_size, choices, activation_of)
    for q, choice in choices.items():
        choice.chosen = pick(choice)
        q.set_range(choice.amax, choice.signed)
    by_name = {c.name: c for c in choices.values()}
    record = None
    if baseline_builder is not None:
        baseline = baseline_builder()
        base_quantizers = {q.name: q for q in baseline.modules() if isinstance(q, ActQuantizer)}
        base_quantizers[order[0].name].load_state_dict(order[0].state_dict())   # same network-input range
        for name, choice in by_name.items():
            base_quantizers[name].set_range(choice.baseline, choice.signed)
        record = guard(model, baseline, images, batch_size, by_name)
    return by_name, record

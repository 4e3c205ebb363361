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
from repq.reparam.verify import tensors_of
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
    candidates: dict[str, float]                       # label -> amax, from all calibration images
    folds: list[dict[str, float]] = field(default_factory=list)   # label -> amax fitted on each fold (guard)
    errors: dict[str, float] = field(default_factory=dict)   # label -> consumer error (MSE)
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


class FloatMode:
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


class _ActivationTracker:
    """Hooks that record, for each consumer layer, the element-wise activation module applied to its output (the
    first time it runs; each output is kept alive until `remove` so that its id cannot be reused)."""

    def __init__(self, model: nn.Module):
        self.activation_of: dict[nn.Module, nn.Module] = {}
        self._produced: dict[int, tuple[nn.Module, Tensor]] = {}
        self._handles = [m.register_forward_hook(self._output_hook) for m in _consumers(model)]
        self._handles += [m.register_forward_pre_hook(self._activation_hook) for m in model.modules()
                          if isinstance(m, _ACTIVATIONS)]

    def _output_hook(self, layer, args, output):
        if isinstance(output, Tensor):
            self._produced[id(output)] = (layer, output)

    def _activation_hook(self, act, args):
        entry = self._produced.get(id(args[0])) if args and isinstance(args[0], Tensor) else None
        if entry is not None and entry[1] is args[0]:
            self.activation_of.setdefault(entry[0], act)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._produced.clear()


@torch.no_grad()
def following_activations(model: nn.Module, images: Tensor) -> dict[nn.Module, nn.Module]:
    """For each consumer layer, the element-wise activation applied to its output, from one float forward."""
    tracker = _ActivationTracker(model)
    try:
        with FloatMode(model):
            model(images)
    finally:
        tracker.remove()
    return tracker.activation_of


@torch.no_grad()
def observe(model: nn.Module, images: Tensor, batch_size: int, bins: int
            ) -> tuple[list[ActQuantizer], dict[ActQuantizer, HistogramObserver], dict[nn.Module, nn.Module]]:
    """One float pass: histograms of every quantizer's input (accumulated over batches), the execution order of the
    quantizers, and for each consumer layer the element-wise activation module applied to its output, if any."""
    order: list[ActQuantizer] = []
    observers: dict[ActQuantizer, HistogramObserver] = {}

    def observe_hook(q: ActQuantizer, args):
        if q not in observers:
            observers[q] = HistogramObserver(bins)
            order.append(q)
        observers[q].update(args[0], q.name)

    handles = [q.register_forward_pre_hook(observe_hook) for q in model.modules() if isinstance(q, ActQuantizer)]
    tracker = _ActivationTracker(model)
    try:
        with FloatMode(model):
            for batch in chunks(images, batch_size):
                model(batch)
                tracker.remove()   # the activations that follow each layer are known after one batch
    finally:
        for h in handles:
            h.remove()
        tracker.remove()
    return order, observers, tracker.activation_of


# A quantizer's grid: (amax, signed, low). low None: symmetric, clipped at amax (signed or [0, amax]); otherwise affine
# unsigned codes spanning [low, amax] (ActQuantizer.set_min_max).
Grid = tuple[float, bool, "float | None"]


def input_grid(observer: HistogramObserver, cfg: CalibrationConfig) -> Grid:
    """The network input's grid under `cfg`: method "affine" spans the observed [min, max] (repq's default: every
    value of a normalized 8-bit image gets its own code); any other method is a symmetric threshold."""
    if cfg.method == "affine":
        return observer.max, False, observer.min
    return observer.amax(cfg), cfg.signed, None


def apply_grid(q: ActQuantizer, grid: Grid) -> None:
    amax, signed, low = grid
    if low is None:
        q.set_range(amax, signed)
    else:
        q.set_min_max(low, amax)


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
def score_candidates(model: nn.Module, images: Tensor, batch_size: int, ranges: dict[ActQuantizer, dict[str, float]],
                     signed: dict[ActQuantizer, bool], activation_of: dict[nn.Module, nn.Module]
                     ) -> dict[ActQuantizer, dict[str, float]]:
    """Per quantizer and candidate range: the mean squared error of its consumer's output (after the consumer's
    activation) with the input quantized at that range and the weights quantized, against the float layer on the
    float input, over `images` (one float pass; each consumer re-run per distinct candidate range)."""
    owner = {m.input_quantizer: m for m in _consumers(model)}
    sums: dict[ActQuantizer, dict[str, float]] = {q: dict.fromkeys(r, 0.0) for q, r in ranges.items()}
    counts: dict[ActQuantizer, int] = dict.fromkeys(ranges, 0)

    def score_hook(layer, args, output):
        q = layer.input_quantizer
        if q not in ranges or not isinstance(output, Tensor):
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
            for label, amax in ranges[q].items():
                if amax not in tried:       # equal thresholds give equal errors
                    q.set_range(amax, signed[q])
                    tried[amax] = float(((act(layer.forward(x)) - reference) ** 2).sum())
                sums[q][label] += tried[amax]
        finally:
            q.mode = "off"
            if float_weight is not None:
                layer.use_float_weight = True
        counts[q] += reference.numel()

    handles = [m.register_forward_hook(score_hook) for m in owner.values() if m.input_quantizer in ranges]
    try:
        with FloatMode(model):
            for batch in chunks(images, batch_size):
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return {q: {label: total / max(1, counts[q]) for label, total in sums[q].items()} for q in ranges}


def pick(choice: Choice) -> str:
    """The candidate with the lowest error; among equal errors (relative 1e-9) the wider range."""
    best = min(choice.errors.values())
    tied = [label for label, e in choice.errors.items() if e <= best * (1 + 1e-9) + 1e-30]
    return max(tied, key=lambda label: choice.candidates[label])


def _flat_outputs(out) -> Tensor:
    """The network's per-image outputs side by side (tensors of a tuple / list / dict output; per-batch scalars
    such as a training loss are left out)."""
    parts = [t.flatten(1) if t.dim() > 1 else t.reshape(len(t), -1) for t in tensors_of(out) if t.dim() >= 1]
    return torch.cat(parts, dim=1)


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
    with FloatMode(model):
        return [_flat_outputs(model(batch)) for batch in chunks(images, batch_size)]


def folds(images: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Two (fit, held-out) splits of the calibration images (even / odd positions of the seeded subset); with
    fewer than 4 images, one split that fits and scores on all of them."""
    if len(images) < 4:
        return [(images, images)]
    even, odd = images[0::2], images[1::2]
    return [(even, odd), (odd, even)]


@torch.no_grad()
def held_out_error(net: nn.Module, splits: list[tuple[Tensor, Tensor]], references: list[list[Tensor]],
                   batch_size: int, fold_ranges: list[dict[str, Grid]]) -> float:
    """Network output error with every quantizer at its range fitted on one fold, measured on the other fold
    (mean over the folds)."""
    quantizers = {q.name: q for q in net.modules() if isinstance(q, ActQuantizer)}
    total = 0.0
    for (_, held), reference, ranges in zip(splits, references, fold_ranges):
        for name, grid in ranges.items():
            apply_grid(quantizers[name], grid)
        total += output_error(net, held, batch_size, reference)
    return total / len(splits)


@torch.no_grad()
def baseline_grids(net: nn.Module, images: Tensor, batch_size: int, base: CalibrationConfig,
                   input_cfg: CalibrationConfig, allow_unsigned: bool) -> dict[str, Grid]:
    """Quantizer name -> the baseline's grid (the network input as `input_cfg`, every other activation at
    BASELINE_CANDIDATE), fitted on `net`'s own float activations over `images`."""
    order, observers, _ = observe(net, images, batch_size, base.bins)
    grids = {}
    for i, q in enumerate(order):
        signed = not (allow_unsigned and observers[q].nonnegative)
        if i == 0:
            grids[q.name] = input_grid(observers[q], replace(input_cfg, bits=q.bits, signed=signed))
        else:
            cfg = replace(base, bits=q.bits, signed=signed)
            grids[q.name] = (candidate_ranges(observers[q], cfg, [BASELINE_CANDIDATE])[BASELINE_CANDIDATE], signed,
                             None)
    return grids


@torch.no_grad()
def guard(model: nn.Module, baseline: nn.Module, splits: list[tuple[Tensor, Tensor]], batch_size: int,
          choices: dict[str, Choice], input_ranges: list[tuple[str, Grid]],
          baseline_ranges: list[dict[str, Grid]]) -> dict:
    """Compare the held-out network output error of the chosen calibrators with two baselines: the plain baseline
    (`baseline`: min-max weights, percentile ranges fitted on its own activations, `baseline_ranges` per fold; the
    float model before any equalization), and this model (its own weights) with percentile ranges everywhere. Where
    worse than the better of the two, move layers one at a time (execution order) to the percentile range, keeping
    each move that lowers the error; if that is still worse than percentile ranges everywhere, take those. Why: the
    per-layer choice looks at one consumer at a time; the guard looks at what the network outputs."""
    references = [float_outputs(model, held, batch_size) for _, held in splits]

    def ranges(label_of: dict[str, str]) -> list[dict[str, Grid]]:
        out = []
        for f, (name, grid) in enumerate(input_ranges):
            fold = {name: grid}
            fold.update({n: (c.folds[f][label_of[n]], c.signed, None) for n, c in choices.items()})
            out.append(fold)
        return out

    labels = {n: c.chosen for n, c in choices.items()}
    percentile_labels = dict.fromkeys(choices, BASELINE_CANDIDATE)
    minmax_error = held_out_error(baseline, splits, references, batch_size, baseline_ranges)
    percentile_error = held_out_error(model, splits, references, batch_size, ranges(percentile_labels))
    base_error = min(minmax_error, percentile_error)
    error = first_error = held_out_error(model, splits, references, batch_size, ranges(labels))
    fallbacks: list[str] = []
    for name, choice in choices.items():
        if error <= base_error:
            break
        if choice.chosen == BASELINE_CANDIDATE:
            continue
        trial_labels = {**labels, name: BASELINE_CANDIDATE}
        trial = held_out_error(model, splits, references, batch_size, ranges(trial_labels))
        if trial < error:
            error, labels = trial, trial_labels
            choice.chosen, choice.guard_fallback = BASELINE_CANDIDATE, True
            fallbacks.append(name)
    if error > percentile_error:        # layer by layer was not enough: percentile ranges everywhere
        for name, choice in choices.items():
            if choice.chosen != BASELINE_CANDIDATE:
                choice.chosen, choice.guard_fallback = BASELINE_CANDIDATE, True
                fallbacks.append(name)
        error = percentile_error
    return {"baseline_error": minmax_error, "percentile_error": percentile_error, "auto_error": first_error,
            "final_error": error, "fallbacks": fallbacks, "worse_than_baseline": error > minmax_error}


@torch.no_grad()
def select_ranges(model: nn.Module, images: Tensor, base: CalibrationConfig, input_cfg: CalibrationConfig,
                  allow_unsigned: bool, batch_size: int, labels: list[str],
                  baseline_builder: Callable[[], nn.Module] | None) -> tuple[dict[str, Choice], dict | None]:
    """Set every activation quantizer of the quantized `model` by the `auto` rule; return the per-layer choices and
    the guard's record (None without a baseline). The network input keeps `input_cfg` (repq: affine min-max;
    P1: max-abs).

    Each candidate is scored on all the calibration images. The guard judges the network held out: ranges fitted
    on half of the images, output error measured on the other half, both ways. Why: on the images it was fitted
    to, a range never pays for the values it will clip on new images, so the network-level comparison would favor
    wide ranges (measured on a zoo model: 4x lower output error than percentile ranges on the calibration images,
    higher on test images)."""
    order, observers, activation_of = observe(model, images, batch_size, base.bins)
    check_all_ran([q for q in model.modules() if isinstance(q, ActQuantizer)], order)
    offered = list(dict.fromkeys(labels))                      # what the choice may pick
    labels = list(dict.fromkeys([*offered, BASELINE_CANDIDATE]))  # plus the guard's fallback range
    first, rest = order[0], order[1:]
    signed = {q: not (allow_unsigned and observers[q].nonnegative) for q in order}

    def cfg(q: ActQuantizer, config: CalibrationConfig = base) -> CalibrationConfig:
        return replace(config, bits=q.bits, signed=signed[q])

    apply_grid(first, input_grid(observers[first], cfg(first, input_cfg)))
    choices = {q: Choice(q.name, signed[q], candidate_ranges(observers[q], cfg(q), labels)) for q in rest}
    errors = score_candidates(model, images, batch_size, {q: c.candidates for q, c in choices.items()}, signed,
                              activation_of)
    for q, choice in choices.items():
        choice.errors = {label: errors[q][label] for label in offered}
        choice.chosen = pick(choice)
    by_name = {c.name: c for c in choices.values()}
    record = None
    if baseline_builder is not None:
        splits = folds(images)
        baseline = baseline_builder()
        input_ranges, baseline_ranges = [], []
        for fit, _ in splits:       # the guard's ranges: fitted on one fold, judged on the other
            _, fold_observers, _ = observe(model, fit, batch_size, base.bins)
            input_ranges.append((first.name, input_grid(fold_observers[first], cfg(first, input_cfg))))
            for q in rest:          # the guard only moves a layer between its choice and percentile
                needed = list(dict.fromkeys([choices[q].chosen, BASELINE_CANDIDATE]))
                choices[q].folds.append(candidate_ranges(fold_observers[q], cfg(q), needed))
            baseline_ranges.append(baseline_grids(baseline, fit, batch_size, base, input_cfg, allow_unsigned))
        record = guard(model, baseline, splits, batch_size, by_name, input_ranges, baseline_ranges)
    apply_grid(first, input_grid(observers[first], cfg(first, input_cfg)))
    for q, choice in choices.items():
        q.set_range(choice.amax, choice.signed)
    return by_name, record

"""Post-training quantization: fuse, quantize every conv/linear weight, calibrate activations (methods.md 2-3).

`quantize(model, calib_data, PTQConfig(...))` returns a model whose forward is the integer simulation; it also
carries `repq_quant`, the metadata a checkpoint needs to rebuild it.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from repq.data.batches import take_images
from repq.errors import RepqError
from repq.quant.bias_correction import correct_bias
from repq.quant.calibrators import ACTIVATION_METHODS, INPUT_METHODS, KL_NORMALIZATIONS, CalibrationConfig
from repq.quant.edges import edge_layers, layer_widths, widens_edges
from repq.quant.equalization import EqualizationRecord, equalize_activations
from repq.quant.modules import (ActQuantizer, CodebookConv2d, CodebookLinear, QuantConv2d,
                                QuantGlobalAvgPool, QuantLinear, calibrate_branches, exact_branches,
                                is_global_avg_pool)
from repq.quant.selection import (CANDIDATES, apply_grid, check_all_ran, following_activations, input_grid,
                                  observe, select_ranges)
from repq.quant.weights import REDUCED_WEIGHT_BITS, WEIGHT_METHODS, quantize_weight
from repq.reparam.model import fuse_blocks, fused_blocks

# Leaf layers with parameters that a fused model may contain; anything else is reported as unsupported.
_PARAMETRIC = (nn.Conv2d, nn.Linear)


@dataclass
class PTQConfig:
    """Options of `repq.quantize`. Defaults: CFWS weights (P1) and `auto` activations (methods.md section 3: each
    activation gets the calibrator that best reconstructs what it feeds, guarded against a min-max + percentile
    baseline), 32 calibration images, calibration on float inputs."""

    weight: str = "cfws"                 # minmax | mse | cfws | cfws_whole
    weight_granularity: str = "channel"  # channel | tensor (for CFWS: the coarse scale; fine is per channel)
    activation: str = "auto"             # auto | minmax | percentile | mse | kl | improved_kl
    w_bits: int = 8
    a_bits: int = 8
    num_samples: int = 32
    seed: int = 0
    sequential: bool = False             # single methods only: calibrate each layer on the already-quantized
                                         # output of the layers before it (P1's sequencer) instead of float inputs;
                                         # `auto` always uses float inputs
    input_activation: str = "affine"     # [choice] the network input: "affine" = unsigned codes spanning its [min,
                                         # max] with a zero point, so each value of a normalized 8-bit image keeps
                                         # its own code; or any single method on a symmetric grid ("minmax": P1's
                                         # max-abs, which gives a normalized image's [0, max] 127 codes)
    unsigned_activations: bool = True    # [choice] unsigned codes ([0, 2^b - 1]) for inputs that are non-negative on
                                         # the calibration images (post-ReLU): a signed grid wastes one bit on them
                                         # (measured: W6A6 94.4 -> 97.5, W4A4 75.2 -> 88.9 on digits-A0). False:
                                         # P1's signed grid everywhere. It is also ONNX Runtime's fused x86 form
    bins: int = 2048
    percentile: float = 99.99
    drop_zeros: bool = True              # improved KL: histogram of the positive values (P1: of the conv output)
    fuse_relu: bool = True
    kl_normalization: str = "p1"         # improved KL divergence: "p1" (P1's code) | "separate" (ablation)
    kl_min_per_bin: float = 0.0          # > 0: fewer KL bins for scarce samples (ablation; P1 keeps 2048)
    auto_candidates: tuple[str, ...] = tuple(CANDIDATES)   # auto: the calibrators it chooses from
    guard: bool = True                   # auto: fall back to percentile ranges (layer by layer, then everywhere)
                                         # where a min-max + percentile baseline or percentile ranges reconstruct
                                         # the network output better, judged on held-out calibration images
    bias_correction: bool = True         # [choice] empirical per-channel bias correction after calibration
                                         # (measured on the zoo: equal at W8A8, better at 6 and 4 bits)
    equalize: bool = True                # [choice] per-channel activation equalization before quantizing
                                         # (repq.quant.equalization): conv -> ReLU -> conv pairs rescaled so that
                                         # small channels get more of the per-tensor activation grid, each scale
                                         # set by a rounding-noise balance; needs per-channel weights. With the
                                         # `auto` guard, dropped again where the network does worse than without
    batch_size: int = 32                 # calibration forward passes run in chunks of this many images
    quantize_pool: bool = False          # also quantize the global-pool input, as integer runtimes do: the last
                                         # conv then runs as a fused integer kernel (one more rounding point)
    edge_bits: int | None = 8            # the input layer and the output layers (the classifier; a detector's
                                         # prediction convs: traced from the graph, repq.quant.edges) and a
                                         # quantized pool at least this wide, the rest at w_bits / a_bits, as 4-bit
                                         # work and repq's QAT do: below 8 bits it is what keeps the first conv (9
                                         # weights per filter on a grey image) from costing points (methods.md).
                                         # A floor: at W8A8 it changes nothing. None: every layer at w_bits / a_bits
    skip_layers: tuple[str, ...] = ()    # layers of the fused model kept in float (names or fnmatch patterns,
                                         # e.g. "detect.*"); also how a layer repq cannot quantize is kept
    cfws_deploy: str = "exact"           # CFWS layers: "exact" (one int32 sum of both convs, float rescale: ONNX
                                         # ConvInteger) | "two_branch" (each conv requantized to int8, then an
                                         # integer add: fused QLinearConv + QLinearAdd, INT8 speed in ONNX Runtime)
                                         # | "residual" (TensorRT-style: the int8 coarse output enters the fine
                                         # conv's sum as its residual input)
    one_conv_fallback: bool = True       # two_branch / residual: a CFWS layer whose output (after its activation)
                                         # one per-channel min-max conv reconstructs better on the calibration
                                         # images is deployed as that one conv (faster too); False: every CFWS
                                         # layer as two branches
    reduce_range: bool = False           # weights of every integer layer (edges and both CFWS branches included) on
                                         # a 7-bit grid (codes within +-63): ONNX Runtime's fast u8 x s8 kernels on
                                         # x64 CPUs without VNNI add pairs of products in int16 and saturate beyond
                                         # 255 x 128; with 7-bit codes they are exact without the slower
                                         # session.x64quantprecision option (ORT's own reduce_range, for the same
                                         # reason; docs/results/saturation.md measures both)

    @property
    def widens_edges(self) -> bool:
        """Whether the edge layers get more bits than the rest (edge_bits is a floor)."""
        return widens_edges(self.edge_bits, self.w_bits, self.a_bits)

    def validate(self) -> None:
        if self.weight not in WEIGHT_METHODS:
            raise RepqError(f"unknown weight method '{self.weight}'; choose one of {', '.join(WEIGHT_METHODS)}")
        if self.activation not in ACTIVATION_METHODS:
            raise RepqError(f"unknown activation method '{self.activation}'; "
                            f"choose one of {', '.join(ACTIVATION_METHODS)}")
        if self.input_activation not in INPUT_METHODS:
            raise RepqError(f"unknown input_activation method '{self.input_activation}'; "
                            f"choose one of {', '.join(INPUT_METHODS)}")
        if self.weight_granularity not in ("channel", "tensor"):
            raise RepqError(f"weight_granularity must be 'channel' or 'tensor', not '{self.weight_granularity}'")
        for name in ("w_bits", "a_bits") + (("edge_bits",) if self.edge_bits is not None else ()):
            if not isinstance(getattr(self, name), int) or not 2 <= getattr(self, name) <= 16:
                raise RepqError(f"{name} must be between 2 and 16, got {getattr(self, name)}")
        if self.num_samples < 1:
            raise RepqError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise RepqError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0 < self.percentile <= 100:
            raise RepqError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.bins < 256 or self.bins & (self.bins - 1):
            raise RepqError(f"bins must be a power of two of at least 256, got {self.bins}")
        if self.kl_normalization not in KL_NORMALIZATIONS:
            raise RepqError(f"kl_normalization must be one of {', '.join(KL_NORMALIZATIONS)}, "
                            f"not '{self.kl_normalization}'")
        if isinstance(self.skip_layers, str) or not all(isinstance(p, str) and p for p in self.skip_layers):
            raise RepqError(f"skip_layers must be a list of layer names or patterns, got {self.skip_layers!r}")
        if self.cfws_deploy not in ("exact", "two_branch", "residual"):
            raise RepqError(f"cfws_deploy must be 'exact', 'two_branch' or 'residual', not '{self.cfws_deploy}'")
        if self.cfws_deploy != "exact" and not self.weight.startswith("cfws"):
            raise RepqError(f"cfws_deploy='{self.cfws_deploy}' deploys CFWS layers; weight '{self.weight}' has none "
                            "(use weight='cfws')")
        if self.cfws_deploy != "exact" and max(self.w_bits, self.a_bits) > 8:
            raise RepqError(f"cfws_deploy='{self.cfws_deploy}' runs int8 kernels: w_bits and a_bits must be at most 8")
        if self.cfws_deploy != "exact" and (self.edge_bits or 0) > 8:
            raise RepqError(f"cfws_deploy='{self.cfws_deploy}' runs int8 kernels: edge_bits must be at most 8")
        if self.reduce_range and max(self.w_bits, self.edge_bits or 0) > 8:
            raise RepqError("reduce_range narrows int8 weights to 7 bits: w_bits and edge_bits must be at most 8")
        unknown = [c for c in self.auto_candidates if c not in CANDIDATES]
        if unknown or not self.auto_candidates:
            raise RepqError(f"auto_candidates must name some of {', '.join(CANDIDATES)}; "
                            f"got {list(self.auto_candidates)}")

    def calibration(self, method: str) -> CalibrationConfig:
        return CalibrationConfig(method=method, bits=self.a_bits, bins=self.bins, percentile=self.percentile,
                                 drop_zeros=self.drop_zeros, fuse_relu=self.fuse_relu,
                                 kl_normalization=self.kl_normalization, min_per_bin=self.kl_min_per_bin)


def fusion_summary(report: list[dict[str, Any]]) -> dict[str, Any]:
    """What the fusion did, for a quantized model's metadata: blocks per method, conv+BN folds, and the verified
    relative difference of the network."""
    methods: dict[str, int] = {}
    for r in fused_blocks(report):
        methods[r["layout"]] = methods.get(r["layout"], 0) + 1
    network = next((r for r in report if r.get("network")), {})
    return {"blocks": methods, "conv_bn_folded": sum(1 for r in report if "bn" in r),
            "relative_diff": network.get("relative_diff")}


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def check_supported(model: nn.Module, keep_float: set[str] = frozenset()) -> None:
    """Refuse layers whose parameters repq cannot quantize (e.g. a BatchNorm that was not folded), unless the user
    keeps them in float (`skip_layers`)."""
    for name, module in model.named_modules():
        if isinstance(module, _PARAMETRIC) or list(module.children()) or name in keep_float:
            continue
        if any(True for _ in module.parameters(recurse=False)) or any(
                b.is_floating_point() for b in module.buffers(recurse=False)):
            raise RepqError(f"unsupported layer {type(module).__name__} at '{name}': repq quantizes Conv2d and "
                            f"Linear layers; fold or remove it, or keep it in float with skip_layers=['{name}']")


def resolve_skip_layers(model: nn.Module, patterns: tuple[str, ...]) -> set[str]:
    """Names of the fused model's leaf layers with parameters that the `skip_layers` patterns select; a pattern
    that selects nothing is an error naming some layers it could have meant."""
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())
              and any(True for _ in m.parameters(recurse=False))]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [n for n in leaves if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise RepqError(f"skip_layers: '{pattern}' matches no layer of the fused model; layers are named like "
                            f"{', '.join(leaves[:3])}, ... (see `repq analyze` or model.named_modules())")
        chosen.update(hits)
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` (dotted path) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _swap_layers(model: nn.Module, layers: dict[str, dict[str, Any]]) -> dict[str, nn.Module]:
    """Replace each named Conv2d/Linear with its quantized twin (uniform codes, or a codebook when the spec says
    so; buffers zeroed); return name -> new layer."""
    swapped = {}
    for name, spec in layers.items():
        float_layer = model.get_submodule(name)
        conv = isinstance(float_layer, nn.Conv2d)
        if spec.get("codebook"):
            layer = (CodebookConv2d if conv else CodebookLinear).from_float(
                float_layer, spec["w_bits"], spec["a_bits"], per_channel=spec.get("codebook_scale") == "channel")
        else:
            layer = (QuantConv2d if conv else QuantLinear).from_float(float_layer, spec["w_bits"], spec["a_bits"],
                                                                       spec["coarse"])
            if spec.get("two_branch"):
                layer.enable_two_branch(spec.get("branch_layout", "two_branch"))
        layer.input_quantizer.name = name
        replace_module(model, name, layer)
        swapped[name] = layer
    return swapped


def _swap_pools(model: nn.Module, pools: dict[str, dict[str, Any]]) -> dict[str, QuantGlobalAvgPool]:
    """Replace each named global average pool with one that quantizes its input."""
    swapped = {}
    for name, spec in pools.items():
        pool = QuantGlobalAvgPool(spec["a_bits"]).to(next(model.parameters()).device)
        pool.input_quantizer.name = name
        replace_module(model, name, pool)
        swapped[name] = pool
    return swapped


def restore_quantized(fused: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """Rebuild the quantized structure described by `meta` on a fused float model (its state is loaded after)."""
    _swap_layers(fused, meta["layers"])
    _swap_pools(fused, meta.get("pools", {}))
    fused.repq_quant = meta
    return fused.eval()


def _widths(fused: nn.Module, config: PTQConfig, keep_float: set[str],
            edges: tuple[list[str], list[str]]) -> dict[str, tuple[int, int]]:
    """Name -> (weight bits, activation bits) of every conv/linear of the fused model that gets quantized."""
    names = [n for n, m in fused.named_modules() if isinstance(m, _PARAMETRIC) and n not in keep_float]
    if not names:
        raise RepqError("the model has no Conv2d or Linear layer to quantize")
    return layer_widths(names, config.w_bits, config.a_bits, config.edge_bits, set(edges[0]) | set(edges[1]),
                        REDUCED_WEIGHT_BITS if config.reduce_range else None)


def _quantize_weights(fused: nn.Module, config: PTQConfig, keep_float: set[str] = frozenset(),
                      edges: tuple[list[str], list[str]] = ([], [])) -> tuple[dict, dict, dict]:
    """Swap every conv/linear of the fused float model (in place, except `keep_float`) for its quantized twin with
    `config`'s weights, and the global pools too with `quantize_pool`; the (input, output) `edges` layers, and the
    pools, get `edge_bits` when it is set. Returns (layer specs, pool specs, name -> new module)."""
    per_channel = config.weight_granularity == "channel"
    bits = _widths(fused, config, keep_float, edges)
    names = list(bits)
    qweights = {n: quantize_weight(fused.get_submodule(n).weight.detach(), config.weight, bits[n][0], per_channel,
                                   getattr(fused.get_submodule(n), "groups", 1))
                for n in names}
    layers = {n: {"coarse": q.coarse_layout, "w_bits": bits[n][0], "a_bits": bits[n][1]}
              for n, q in qweights.items()}
    swapped = _swap_layers(fused, layers)
    for name, layer in swapped.items():
        layer.set_quantized_weight(qweights[name])
    pool_bits = max(config.edge_bits or 0, config.a_bits)   # the pool feeds the classifier: as wide as the edges
    pools = {n: {"a_bits": pool_bits} for n, m in fused.named_modules() if is_global_avg_pool(m)} \
        if config.quantize_pool else {}
    swapped.update(_swap_pools(fused, pools))
    return layers, pools, swapped


def quantize(model: nn.Module, calib_data: Any, config: PTQConfig | None = None) -> nn.Module:
    """Fuse `model` (if needed), quantize every conv and linear layer and calibrate the activations.

    `calib_data` may be a tensor of images, a DataLoader, an iterable of batches or an ImageDataset; at most
    `config.num_samples` images are used (a seeded subset where the data allows it). `model` is left untouched.
    The result's `repq_quant` metadata records, per layer, the calibrator each activation got.
    """
    config = config or PTQConfig()
    config.validate()
    images = take_images(calib_data, config.num_samples, config.seed)
    if len(images) < config.num_samples:
        warnings.warn(f"calibration data has {len(images)} images, fewer than the {config.num_samples} asked; "
                      "using them all", stacklevel=2)
    # a verified copy: each fused block and the network are checked against `model` on calibration images
    fused, fusion = fuse_blocks(model, example_input=images[:2].to(_device_of(model)))
    config_of_model = getattr(model, "repq_config", None)
    if not fused_blocks(fusion) and not (isinstance(config_of_model, dict) and config_of_model.get("deploy")):
        warnings.warn("no re-parameterizable block found: quantizing the model's plain convs", stacklevel=2)
    keep_float = resolve_skip_layers(fused, config.skip_layers)
    check_supported(fused, keep_float)
    device = next(fused.parameters()).device
    images = images.to(device)
    edges = ([], [])
    if config.widens_edges:
        first, last = edge_layers(fused, images[:2])
        edges = ([n for n in first if n not in keep_float], [n for n in last if n not in keep_float])
    guarded = config.activation == "auto" and config.guard
    plain = copy.deepcopy(fused) if config.equalize and guarded else None
    quantized = _quantize_fused(fused, images, config, keep_float, edges, fusion)
    record = quantized.repq_quant
    if plain is not None and record["equalization"]["pairs"] and record["auto"]["guard"]["worse_than_baseline"]:
        # the guard says the equalized network reconstructs its output worse than the plain baseline: quantize
        # without equalization too and keep whichever does better on the held-out calibration images
        alternative = _quantize_fused(plain, images, replace(config, equalize=False), keep_float, edges, fusion)
        kept = min((quantized, alternative), key=lambda q: q.repq_quant["auto"]["guard"]["final_error"])
        kept.repq_quant["equalization"] = dict(record["equalization"], kept=kept is quantized)
        quantized = kept
    if any("branch_errors" in spec for spec in quantized.repq_quant["layers"].values()):
        quantized.repq_quant["two_branch_check"] = check_two_branch(model, quantized, images, config)
    return quantized


@torch.no_grad()
def check_two_branch(model: nn.Module, quantized: nn.Module, images: torch.Tensor, config: PTQConfig) -> dict:
    """The network output error (mean squared difference from the float outputs, on the calibration images) of the
    two-branch / residual CFWS model next to the plain INT8 baseline's: per-channel min-max weights, percentile
    ranges, nothing else, which ONNX Runtime runs at least as fast. Why: rounding each branch to int8 before the
    add can cost more than CFWS gains (on a zoo model, 9 pt below the exact form before the branch scales were
    scored after the activation and the one-conv fallback existed); a deployment worse than the baseline is
    reported (a warning and `worse_than_baseline`), not left to be found after deploying. Also lists the CFWS
    layers deployed as one conv."""
    from repq.quant.selection import float_outputs, output_error
    baseline = quantize(model, images, replace(config, weight="minmax", activation="percentile", equalize=False,
                                               bias_correction=False, sequential=False, guard=False,
                                               cfws_deploy="exact", num_samples=len(images)))
    # the float outputs from the baseline: without bias correction its float mode is the float network (bias
    # correction changes the float biases the other model's float mode would use)
    reference = float_outputs(baseline, images, config.batch_size)
    errors = {key: output_error(net, images, config.batch_size, reference)
              for key, net in (("error", quantized), ("baseline_error", baseline))}
    worse = errors["error"] > errors["baseline_error"]
    if worse:
        warnings.warn(f"cfws_deploy='{config.cfws_deploy}': the network output error on the calibration images is "
                      f"{errors['error'] / max(errors['baseline_error'], 1e-30):.1f}x that of per-channel min-max "
                      "INT8 (which runs as fast); check its accuracy before deploying, or use cfws_deploy='exact'",
                      stacklevel=3)
    one_conv = sorted(n for n, spec in quantized.repq_quant["layers"].items()
                      if spec.get("branch_errors", {}).get("deployed") == "single_conv")
    two_branch = sum(1 for spec in quantized.repq_quant["layers"].values() if spec.get("two_branch"))
    return {**errors, "worse_than_baseline": worse, "two_branch_layers": two_branch, "one_conv_layers": one_conv}


def _quantize_fused(fused: nn.Module, images: torch.Tensor, config: PTQConfig, keep_float: set[str],
                    edges: tuple[list[str], list[str]], fusion: list[dict[str, Any]]) -> nn.Module:
    """`quantize` on the verified fused float model (changed in place into the quantized one)."""
    float_copy = copy.deepcopy(fused) if config.activation == "auto" and config.guard else None
    equalization = EqualizationRecord(skipped="off (PTQConfig.equalize=False)")
    if config.equalize and config.weight_granularity != "channel":
        equalization.skipped = "per-tensor weights (a per-channel scale would change the producer's weight grid)"
    elif config.equalize:
        equalization = equalize_activations(fused, images, _widths(fused, config, keep_float, edges), config.weight,
                                            config.unsigned_activations, keep_float, config.batch_size)
    layers, pools, swapped = _quantize_weights(fused, config, keep_float, edges)
    auto_record = None
    if config.activation == "auto":
        def build_baseline() -> nn.Module:   # the guard's baseline: per-channel min-max weights
            _quantize_weights(float_copy, replace(config, weight="minmax", weight_granularity="channel"), keep_float,
                              edges)
            return float_copy
        choices, guard_record = select_ranges(
            fused, images, config.calibration("auto"), config.calibration(config.input_activation),
            config.unsigned_activations, config.batch_size, list(config.auto_candidates),
            build_baseline if float_copy is not None else None)
        auto_record = {"choices": {n: c.as_dict() for n, c in choices.items()}, "guard": guard_record}
        methods = {n: c.chosen for n, c in choices.items()}
    else:
        first = _calibrate(fused, images, config)
        methods = {n: config.activation for n in swapped if n != first}
    if config.cfws_deploy != "exact":
        # each CFWS layer's deployed form first (two branches, or one conv where that reconstructs better), so that
        # bias correction measures the network as deployed
        for name, layer in swapped.items():
            if isinstance(layer, QuantConv2d) and layer.coarse is not None:
                layer.enable_two_branch(config.cfws_deploy)
                layers[name].update(two_branch=True, branch_layout=config.cfws_deploy)
        activations = following_activations(fused, images[:config.batch_size])
        per_channel = config.weight_granularity == "channel"
        deployed = calibrate_branches(fused, images, config.batch_size, activations, per_channel,
                                      fallback=config.one_conv_fallback)
        for name, record in deployed.items():   # a layer kept as one conv: plain min-max weights, no coarse part
            layers[name].update(branch_errors=record)
            if record["deployed"] == "single_conv":
                layers[name].update(coarse=None, two_branch=False)
        if config.bias_correction:
            exact_branches(fused)
    shifts = correct_bias(fused, images) if config.bias_correction else None
    widened = fit_biases(swapped)
    if config.cfws_deploy != "exact" and (shifts is not None or widened):   # the fine branch includes the final bias
        for name, record in calibrate_branches(fused, images, config.batch_size, activations, per_channel,
                                               fallback=False).items():
            layers[name].update(branch_errors=record)
    for name, layer in swapped.items():
        q = layer.input_quantizer
        (pools if name in pools else layers)[name].update(input_scale=float(q.scale), input_signed=q.signed,
                                                          calibrator=methods.get(name, config.input_activation),
                                                          **({"input_zero_point": int(q.zero_point)} if q.affine
                                                             else {}))
    fused.repq_quant = {"ptq": asdict(config), "layers": layers, "pools": pools, "calibration_images": len(images),
                        "input_shape": list(images.shape[1:]), "auto": auto_record, "bias_correction": shifts,
                        "fusion": fusion_summary(fusion), "float_layers": sorted(keep_float),
                        "edges": {"input": edges[0], "output": edges[1]} if config.widens_edges else None,
                        "bias_grid_widened": widened, "equalization": {**equalization.as_dict(), "kept": True}}
    return fused.eval()


def fit_biases(layers: dict[str, nn.Module]) -> dict[str, int]:
    """Layer name -> channels whose weight scale was widened so the bias fits the int32 grid (see
    QuantWeightMixin.fit_bias_to_int32); only layers where that happened."""
    widened = {}
    for name, layer in layers.items():
        if isinstance(layer, (QuantConv2d, QuantLinear)):
            count = layer.fit_bias_to_int32()
            if count:
                widened[name] = count
    return widened


@torch.no_grad()
def _calibrate(model: nn.Module, images: torch.Tensor, config: PTQConfig) -> str:
    """Calibrate every input quantizer with one method; returns the name of the first (the network input), which
    uses `config.input_activation`. Float pass: histograms of the float network's activations accumulate over
    batches of `config.batch_size`. Sequential (P1's sequencer): one forward over all images in which each
    quantizer, in execution order, fixes its scale on the already-quantized output of the layers before it."""
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    for q in quantizers:
        q.allow_unsigned = config.unsigned_activations
    if not config.sequential:
        order, observers, _ = observe(model, images, config.batch_size, config.bins)
        check_all_ran(quantizers, order)
        for i, q in enumerate(order):
            obs = observers[q]
            signed = not (config.unsigned_activations and obs.nonnegative)
            cfg = replace(config.calibration(config.input_activation if i == 0 else config.activation), bits=q.bits,
                          signed=signed)
            apply_grid(q, input_grid(obs, cfg) if i == 0 else (obs.amax(cfg), signed, None))
        return order[0].name
    order: list[ActQuantizer] = []

    def first_call_hook(module: ActQuantizer, args):
        if not order:
            module.calibration = config.calibration(config.input_activation)
        order.append(module)

    handles = [q.register_forward_pre_hook(first_call_hook) for q in quantizers]
    for q in quantizers:
        q.calibration = config.calibration(config.activation)
        q.mode = "calibrate"
    try:
        model.eval()(images)
    finally:
        for h in handles:
            h.remove()
        for q in quantizers:
            q.mode = "quant"
    check_all_ran(quantizers, order)
    return order[0].name


def input_ranges(meta: dict[str, Any]) -> dict[str, float]:
    """Layer (or pool) name -> the (upper) clipping threshold of its input quantizer, from a quantized model's
    metadata."""
    ranges = {}
    for name, spec in {**meta["layers"], **meta.get("pools", {})}.items():
        levels = 2 ** (spec["a_bits"] - 1) - 1 if spec["input_signed"] else 2 ** spec["a_bits"] - 1
        ranges[name] = spec["input_scale"] * (levels - spec.get("input_zero_point", 0))
    return ranges

"""Post-training quantization: fuse, quantize every conv/linear weight, calibrate activations (methods.md 2-3).

`quantize(model, calib_data, PTQConfig(...))` returns a model whose forward is the integer simulation; it also
carries `repq_quant`, the metadata a checkpoint needs to rebuild it.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from repq.data.batches import take_images
from repq.errors import RepqError
from repq.quant.calibrators import ACTIVATION_METHODS, CalibrationConfig
from repq.quant.modules import (QUANT_LAYERS, ActQuantizer, CodebookConv2d, CodebookLinear, QuantConv2d,
                                QuantGlobalAvgPool, QuantLinear, is_global_avg_pool)
from repq.quant.weights import WEIGHT_METHODS, quantize_weight
from repq.reparam.model import fuse_blocks

# Leaf layers with parameters that a fused model may contain; anything else is reported as unsupported.
_PARAMETRIC = (nn.Conv2d, nn.Linear)


@dataclass
class PTQConfig:
    """Options of `repq.quantize`. Defaults follow P1: CFWS weights, improved-KL activations, 32 images."""

    weight: str = "cfws"                 # minmax | mse | cfws | cfws_whole
    weight_granularity: str = "channel"  # channel | tensor (for CFWS: the coarse scale; fine is per channel)
    activation: str = "improved_kl"      # minmax | percentile | mse | kl | improved_kl
    w_bits: int = 8
    a_bits: int = 8
    num_samples: int = 32
    seed: int = 0
    sequential: bool = True              # calibrate each layer with the earlier layers already quantized
    input_activation: str = "minmax"     # the network input (P1: max-abs)
    unsigned_activations: bool = False   # uint8-style codes for non-negative (post-ReLU) inputs
    bins: int = 2048
    percentile: float = 99.99
    drop_zeros: bool = True
    fuse_relu: bool = True
    quantize_pool: bool = False          # also quantize the global-pool input, as integer runtimes do: the last
                                         # conv then runs as a fused integer kernel (one more rounding point)

    def validate(self) -> None:
        if self.weight not in WEIGHT_METHODS:
            raise RepqError(f"unknown weight method '{self.weight}'; choose one of {', '.join(WEIGHT_METHODS)}")
        for name in ("activation", "input_activation"):
            if getattr(self, name) not in ACTIVATION_METHODS:
                raise RepqError(f"unknown {name} method '{getattr(self, name)}'; "
                                f"choose one of {', '.join(ACTIVATION_METHODS)}")
        if self.weight_granularity not in ("channel", "tensor"):
            raise RepqError(f"weight_granularity must be 'channel' or 'tensor', not '{self.weight_granularity}'")
        for name in ("w_bits", "a_bits"):
            if not 2 <= getattr(self, name) <= 16:
                raise RepqError(f"{name} must be between 2 and 16, got {getattr(self, name)}")
        if self.num_samples < 1:
            raise RepqError(f"num_samples must be at least 1, got {self.num_samples}")

    def calibration(self, method: str) -> CalibrationConfig:
        return CalibrationConfig(method=method, bits=self.a_bits, bins=self.bins, percentile=self.percentile,
                                 drop_zeros=self.drop_zeros, fuse_relu=self.fuse_relu)


def check_supported(model: nn.Module) -> None:
    """Refuse layers whose parameters repq cannot quantize (e.g. a BatchNorm that was not folded)."""
    for name, module in model.named_modules():
        if isinstance(module, _PARAMETRIC) or list(module.children()):
            continue
        if any(True for _ in module.parameters(recurse=False)) or any(
                b.is_floating_point() for b in module.buffers(recurse=False)):
            raise RepqError(f"unsupported layer {type(module).__name__} at '{name}': repq quantizes Conv2d and "
                            "Linear layers; fold or remove it before quantizing")


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
            layer = (CodebookConv2d if conv else CodebookLinear).from_float(float_layer, spec["w_bits"], spec["a_bits"])
        else:
            layer = (QuantConv2d if conv else QuantLinear).from_float(float_layer, spec["w_bits"], spec["a_bits"],
                                                                       spec["coarse"])
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


def quantize(model: nn.Module, calib_data: Any, config: PTQConfig | None = None) -> nn.Module:
    """Fuse `model` (if needed), quantize every conv and linear layer and calibrate the activations.

    `calib_data` may be a tensor of images, a DataLoader, an iterable of batches or an ImageDataset; at most
    `config.num_samples` images are used (a seeded subset where the data allows it). `model` is left untouched.
    """
    config = config or PTQConfig()
    config.validate()
    images = take_images(calib_data, config.num_samples, config.seed)
    if len(images) < config.num_samples:
        warnings.warn(f"calibration data has {len(images)} images, fewer than the {config.num_samples} asked; "
                      "using them all", stacklevel=2)
    fused, blocks = fuse_blocks(model, verify=False)  # a copy; plain models come back unchanged
    config_of_model = getattr(model, "repq_config", None)
    if not blocks and not (isinstance(config_of_model, dict) and config_of_model.get("deploy")):
        warnings.warn("no re-parameterizable block found: quantizing the model's plain convs", stacklevel=2)
    check_supported(fused)
    device = next(fused.parameters()).device
    per_channel = config.weight_granularity == "channel"
    names = [n for n, m in fused.named_modules() if isinstance(m, _PARAMETRIC)]
    if not names:
        raise RepqError("the model has no Conv2d or Linear layer to quantize")
    qweights = {n: quantize_weight(fused.get_submodule(n).weight.detach(), config.weight, config.w_bits, per_channel)
                for n in names}
    layers = {n: {"coarse": q.coarse_layout, "w_bits": config.w_bits, "a_bits": config.a_bits}
              for n, q in qweights.items()}
    swapped = _swap_layers(fused, layers)
    for name, layer in swapped.items():
        layer.set_quantized_weight(qweights[name])
    pools = {n: {"a_bits": config.a_bits} for n, m in fused.named_modules() if is_global_avg_pool(m)} \
        if config.quantize_pool else {}
    swapped.update(_swap_pools(fused, pools))
    _calibrate(fused, images.to(device), config)
    for name, layer in swapped.items():
        q = layer.input_quantizer
        (pools if name in pools else layers)[name].update(input_scale=float(q.scale), input_signed=q.signed)
    fused.repq_quant = {"ptq": asdict(config), "layers": layers, "pools": pools, "calibration_images": len(images),
                        "input_shape": list(images.shape[1:])}
    return fused.eval()


@torch.no_grad()
def _calibrate(model: nn.Module, images: torch.Tensor, config: PTQConfig) -> None:
    """One forward over the calibration batch in which each input quantizer, in execution order, fixes its scale
    (sequential: on the already-quantized output of the layers before it; else on the float network)."""
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    order: list[ActQuantizer] = []

    def first_call_hook(module: ActQuantizer, args):
        if not order:
            module.calibration = config.calibration(config.input_activation)
        order.append(module)

    handles = [q.register_forward_pre_hook(first_call_hook) for q in quantizers]
    for q in quantizers:
        q.calibration = config.calibration(config.activation)
        q.allow_unsigned = config.unsigned_activations
        q.mode = "calibrate" if config.sequential else "observe"
    for layer in model.modules():
        if isinstance(layer, QUANT_LAYERS):
            layer.use_float_weight = not config.sequential
    try:
        model.eval()(images)
    finally:
        for h in handles:
            h.remove()
        for q in quantizers:
            q.mode = "quant"
        for layer in model.modules():
            if isinstance(layer, QUANT_LAYERS):
                layer.use_float_weight = False
    missed = [q.name for q in quantizers if q not in order]
    if missed:
        raise RepqError(f"layers never ran during calibration: {', '.join(missed)}; repq needs every layer used")

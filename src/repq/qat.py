"""Quantization-aware training on the fused model (methods.md section 5): uniform LSQ or ClusterQAT.

    qat_model = repq.prepare_qat(model, repq.QATConfig(method="cluster", w_bits=4, a_bits=4), calib_images)
    repq.train(qat_model, train_data, repq.TrainConfig(epochs=2, lr=0.01))     # plain training, DDP included
    qmodel = repq.convert_qat(qat_model)   # deploy layers: integer codes (LSQ) or indices + codebook (cluster)

The prepared model's forward is fake-quantized with straight-through gradients; the converted model is the same
function in the layers `repq.evaluate`, checkpoints and `repq.export_onnx` understand.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from repq.data.batches import take_images
from repq.errors import RepqError
from repq.ptq import check_supported, fit_biases, replace_module
from repq.quant.calibrators import ACTIVATION_METHODS
from repq.quant.edges import edge_layers, layer_widths
from repq.quant.modules import (CodebookConv2d, CodebookLinear, QuantConv2d, QuantGlobalAvgPool, QuantLinear,
                                is_global_avg_pool)
from repq.quant.primitives import quantize
from repq.quant.qat_modules import (
    CODEBOOK_SCALES,
    QAT_LAYERS,
    CodebookQuantizer,
    LSQQuantizer,
    QATConv2d,
    QATGlobalAvgPool,
    QATLinear,
    lsq_weight_quantizer,
)
from repq.quant.weights import REDUCED_WEIGHT_BITS, QuantizedWeight
from repq.reparam.model import fuse_blocks
from repq.reparam.verify import guess_example

QAT_METHODS = ("lsq", "cluster")


@dataclass
class QATConfig:
    """Options of `repq.prepare_qat`. Every [choice] of methods.md section 5 is a field."""

    method: str = "cluster"             # lsq (uniform, learned steps) | cluster (k-means codebook)
    w_bits: int = 4
    a_bits: int = 4
    codebook: str = "refit"             # cluster: refit (Lloyd steps every refit_every steps) | learned (gradient)
    refit_every: int = 100
    lloyd_iters: int = 3
    codebook_grid: str = "free"         # cluster: free (any float centroids; deployed as float convs on looked-up
                                        # weights) | int8 (centroids snapped to one per-layer int8 grid: deployed
                                        # as fused int8 convs, QLinearConv in ONNX Runtime)
    codebook_scale: str = "layer"       # cluster: layer (one codebook in weight units) | channel (one codebook of
                                        # weights divided by their output channel's max |w|; the deployed layer
                                        # keeps that scale per channel)
    weight_init: str = "mse"            # lsq: initial per-channel steps from this PTQ weight quantizer (minmax | mse)
    activation_init: str = "mse"        # initial activation steps from this PTQ calibrator
    unsigned_activations: bool = True   # non-negative (post-ReLU) inputs get unsigned codes: one more level bit
    affine_activations: bool = False    # inputs with negative values (SiLU outputs) get unsigned codes with a
                                        # learned zero point (LSQ+) instead of a signed symmetric grid
    edge_bits: int | None = 8           # the input layer and the output layers (all that write a network output:
                                        # the classifier; a detector's six prediction convs) at this width
                                        # (None: same as the rest)
    quantize_pool: bool = False         # also quantize the global-pool input (at the last layer's width), trained
                                        # like the others: the last conv then runs fused in ONNX Runtime
    reduce_range: bool = False          # integer weights (LSQ; an int8-grid codebook) within +-63, edge layers
                                        # included: exact in ONNX Runtime's fast u8 x s8 kernels on x64 CPUs
                                        # without VNNI, as PTQConfig.reduce_range (LSQ: at most 7 bits; cluster:
                                        # the grid of max |centroid| / 63, and at most 2^7 centroids)
    num_samples: int = 32
    seed: int = 0

    def validate(self) -> None:
        if self.method not in QAT_METHODS:
            raise RepqError(f"unknown QAT method '{self.method}'; choose one of {', '.join(QAT_METHODS)}")
        for name in ("w_bits", "a_bits") + (("edge_bits",) if self.edge_bits is not None else ()):
            if not 2 <= getattr(self, name) <= 8:
                raise RepqError(f"{name} must be between 2 and 8 for QAT, got {getattr(self, name)}")
        if self.codebook not in ("refit", "learned"):
            raise RepqError(f"codebook must be 'refit' or 'learned', not '{self.codebook}'")
        if self.codebook_grid not in ("free", "int8"):
            raise RepqError(f"codebook_grid must be 'free' or 'int8', not '{self.codebook_grid}'")
        if self.codebook_scale not in CODEBOOK_SCALES:
            raise RepqError(f"codebook_scale must be one of {', '.join(CODEBOOK_SCALES)}, not '{self.codebook_scale}'")
        if self.weight_init not in ("minmax", "mse"):
            raise RepqError(f"weight_init must be 'minmax' or 'mse', not '{self.weight_init}'")
        if self.activation_init not in ACTIVATION_METHODS:
            raise RepqError(f"unknown activation_init '{self.activation_init}'; "
                            f"choose one of {', '.join(ACTIVATION_METHODS)}")
        if self.reduce_range and self.method == "cluster" and self.codebook_grid != "int8":
            raise RepqError("reduce_range narrows integer weight codes, and a free codebook deploys as float convs: "
                            "use codebook_grid='int8' (or method='lsq')")
        if self.refit_every < 0 or self.lloyd_iters < 1 or self.num_samples < 1:
            raise RepqError("refit_every must be >= 0, lloyd_iters and num_samples >= 1")


def _edges(fused: nn.Module, images: torch.Tensor | None, names: list[str]) -> tuple[list[str], list[str]]:
    """The input and output layers (repq.quant.edges) traced on two calibration images; without images, on a guessed
    32 x 32 input, falling back to the first and last registered layer (with a warning) if the model cannot run
    on it."""
    if images is not None:
        return edge_layers(fused, images[:2])
    try:
        return edge_layers(fused, guess_example(fused))
    except (RuntimeError, ValueError) as err:
        warnings.warn(f"could not trace the output layers on a guessed 32x32 input ({str(err).splitlines()[0]}); "
                      "keeping the first and last registered layers at edge_bits: pass calibration images to "
                      "prepare_qat to trace them", stacklevel=3)
        return names[:1], names[-1:]


def prepare_qat(model: nn.Module, config: QATConfig | None = None, calib_data: Any = None) -> nn.Module:
    """Fuse `model` (if needed) and replace every conv/linear by a fake-quantized QAT layer.

    Weight quantizers start from PTQ (LSQ: per-channel steps; cluster: 1-D k-means from linearly spaced
    centroids). Activation steps start from the `activation_init` calibrator on `calib_data` (a float pass over
    at most `num_samples` images), or on the first training batch when no data is given. `model` is untouched.
    """
    config = config or QATConfig()
    config.validate()
    fused, _ = fuse_blocks(model)   # verified on two random images
    check_supported(fused)
    names = [n for n, m in fused.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not names:
        raise RepqError("the model has no Conv2d or Linear layer to quantize")
    images = None
    if calib_data is not None:
        images = take_images(calib_data, config.num_samples, config.seed)
        if len(images) < config.num_samples:
            warnings.warn(f"calibration data has {len(images)} images, fewer than the {config.num_samples} asked",
                          stacklevel=2)
        images = images.to(next(fused.parameters()).device)
    first, last = _edges(fused, images, names)
    grid_bits = REDUCED_WEIGHT_BITS if config.reduce_range else 8
    bits = layer_widths(names, config.w_bits, config.a_bits, config.edge_bits, set(first) | set(last),
                        REDUCED_WEIGHT_BITS if config.reduce_range else None)
    for name in names:
        layer = fused.get_submodule(name)
        w_bits, a_bits = bits[name]
        if config.method == "lsq":
            weight_q = lsq_weight_quantizer(layer.weight, w_bits, config.weight_init)
        else:
            weight_q = CodebookQuantizer(layer.weight, w_bits, config.codebook, config.refit_every,
                                         config.lloyd_iters, int8_grid=config.codebook_grid == "int8",
                                         scale=config.codebook_scale, grid_bits=grid_bits).to(layer.weight.device)
        input_q = LSQQuantizer(a_bits, signed=True, init=config.activation_init,
                               allow_unsigned=config.unsigned_activations,
                               affine=config.affine_activations).to(layer.weight.device)
        input_q.name = name
        cls = QATConv2d if isinstance(layer, nn.Conv2d) else QATLinear
        replace_module(fused, name, cls.from_float(layer, weight_q, input_q))
    pools = {}
    if config.quantize_pool:   # the pool feeds the classifier: it takes the output layers' activation width
        pool_bits = bits[last[-1] if last else names[-1]][1]
        for name in [n for n, m in fused.named_modules() if is_global_avg_pool(m)]:
            input_q = LSQQuantizer(pool_bits, signed=True, init=config.activation_init,
                                   allow_unsigned=config.unsigned_activations,
                                   affine=config.affine_activations).to(next(fused.parameters()).device)
            input_q.name = name
            replace_module(fused, name, QATGlobalAvgPool(input_q))
            pools[name] = pool_bits
    fused.repq_qat = {"qat": asdict(config), "bits": {n: list(b) for n, b in bits.items()}, "pools": pools,
                      "edges": {"input": first, "output": last}}
    if images is not None:
        initialize_activations(fused, images)
    return fused


@torch.no_grad()
def initialize_activations(qat_model: nn.Module, images: torch.Tensor) -> None:
    """One float forward in which every activation quantizer takes its initial step from its own input."""
    quantizers = [m for m in qat_model.modules() if isinstance(m, LSQQuantizer) and m.step.dim() == 0]
    for q in quantizers:
        q.mode = "observe"
    was_training = qat_model.training
    try:
        qat_model.eval()(images)
    finally:
        for q in quantizers:
            q.mode = "quant"
        qat_model.train(was_training)
    qat_model.repq_qat["input_shape"] = list(images.shape[1:])
    missed = [q.name for q in quantizers if not bool(q.initialized)]
    if missed:
        raise RepqError(f"layers never ran during QAT initialization: {', '.join(missed)}")


def _deploy_activation(q, act: LSQQuantizer, name: str) -> dict[str, Any]:
    """Give the deploy quantizer `q` the trained LSQ step, code range and zero point of `act`; returns its
    metadata."""
    q.name = name
    if act.affine:
        zero_point = act.current_zero_point()
        q.set_affine(float(act.current_step()), zero_point)
        return {"input_scale": float(act.current_step()), "input_signed": False, "input_zero_point": zero_point}
    q.scale.copy_(act.current_step())
    q.qmin.copy_(act.qmin)
    q.qmax.copy_(act.qmax)
    return {"input_scale": float(act.current_step()), "input_signed": act.signed}


@torch.no_grad()
def convert_qat(qat_model: nn.Module) -> nn.Module:
    """The deploy model of a QAT model: LSQ layers become integer-code layers (QuantConv2d/QuantLinear), cluster
    layers become indices + codebook (CodebookConv2d/CodebookLinear). Same outputs, new module; input untouched."""
    meta = getattr(qat_model, "repq_qat", None)
    if meta is None:
        raise RepqError("convert_qat takes a model returned by repq.prepare_qat")
    model = copy.deepcopy(qat_model).eval()
    layers: dict[str, dict[str, Any]] = {}
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, QAT_LAYERS):
            continue
        act = layer.input_quantizer
        if not bool(act.initialized):
            raise RepqError(f"layer '{name}' has no activation step yet; pass calibration images to prepare_qat "
                            "or train before converting")
        w_bits, a_bits = meta["bits"][name]
        conv = isinstance(layer, nn.Conv2d)
        wq = layer.weight_quantizer
        if isinstance(wq, LSQQuantizer):
            new = (QuantConv2d if conv else QuantLinear).from_float(layer, w_bits, a_bits, None)
            step = wq.current_step()
            codes = quantize(layer.weight, step, 0.0, int(wq.qmin), int(wq.qmax), axis=0)
            new.set_quantized_weight(QuantizedWeight(codes, step))
            spec = {"coarse": None}
        elif wq.int8_grid:   # the codebook lies on an int8 grid: uniform int8 codes, fused int8 convs
            new = (QuantConv2d if conv else QuantLinear).from_float(layer, wq.grid_bits, a_bits, None)
            codes = wq.int8_codes(wq.codebook.detach(), wq.indices(layer.weight), wq.channel_scale(layer.weight))
            scale = wq.grid_scale(layer.weight).expand(layer.weight.shape[0]).clone()
            new.set_quantized_weight(QuantizedWeight(codes, scale))
            spec = {"coarse": None, "codebook_grid": {"entries": wq.codebook.numel(), "bits": w_bits,
                                                      "scale": wq.scale, "grid_bits": wq.grid_bits}}
        else:
            new = (CodebookConv2d if conv else CodebookLinear).from_float(layer, w_bits, a_bits,
                                                                          per_channel=wq.scale == "channel")
            new.set_codebook(wq.indices(layer.weight), wq.codebook.detach(), wq.channel_scale(layer.weight))
            spec = {"coarse": None, "codebook": wq.codebook.numel(), "codebook_scale": wq.scale}
        replace_module(model, name, new)
        layers[name] = {**spec, "w_bits": spec["codebook_grid"]["grid_bits"] if "codebook_grid" in spec else w_bits,
                        "a_bits": a_bits,
                        **_deploy_activation(new.input_quantizer, act, name)}
    pools: dict[str, dict[str, Any]] = {}
    for name, pool in list(model.named_modules()):
        if isinstance(pool, QATGlobalAvgPool):
            new = QuantGlobalAvgPool(meta["pools"][name]).to(pool.input_quantizer.step.device)
            replace_module(model, name, new)
            pools[name] = {"a_bits": meta["pools"][name],
                           **_deploy_activation(new.input_quantizer, pool.input_quantizer, name)}
    widened = fit_biases({n: model.get_submodule(n) for n in layers})
    del model.repq_qat
    model.repq_quant = {"qat": meta["qat"], "layers": layers, "pools": pools, "input_shape": meta.get("input_shape"),
                        "edges": meta["edges"], "bias_grid_widened": widened}
    return model

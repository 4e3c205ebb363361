"""The `repq` command line: train, ptq, qat, eval, export, analyze, import, demo. Human tables by default, one
JSON object with --json."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from repq.cli_checks import (CheckFailed, OneLineParser, bit_width, channel_values, check_data_matches,
                             check_input_file, check_output_file, check_output_folder, crop_fraction, data_meta,
                             fraction, image_size, nonnegative_float, nonnegative_int, positive_float, positive_int,
                             resolve_device)
from repq import cli_detect
from repq.errors import RepqError
from repq.tables import format_table


# ---------------------------------------------------------------- output helpers
def _finite(value: Any) -> Any:
    """NaN / Infinity become null: JSON has no such numbers."""
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _emit(args: argparse.Namespace, result: dict[str, Any], human: str) -> None:
    if args.json:
        print(json.dumps(_finite(result), default=str, allow_nan=False))
    else:
        print(human)


def _norm_method(name: str) -> str:
    return name.strip().replace("-", "_")


def _check_data(payload: dict[str, Any], data, allow_mismatch: bool) -> None:
    """The data must fit the checkpoint's model (classes, channels) and match the data it recorded."""
    model_config = payload["model"]
    classes, chans = model_config.get("num_classes", 1000), model_config.get("in_chans", 3)
    if data.num_classes != classes or data.in_chans != chans:
        raise RepqError(f"the checkpoint's model takes {chans}-channel images and {classes} classes but "
                        f"{data.name or 'the data'} has {data.in_chans} channels and {data.num_classes} classes; "
                        "use the data it was trained on")
    check_data_matches(payload, data, allow_mismatch)


_STREAM_FLAGS = ("image_size", "crop_pct", "interpolation", "mean", "std", "skip_corrupt")
_LOADED: list[Any] = []   # streamed datasets of this command, for the --skip-corrupt note


def _load_data(args: argparse.Namespace, split: str, payload: dict[str, Any] | None = None,
               spec: str | None = None):
    """The dataset of --data (or `spec`); imagefolder / filelist data stream through the transform the flags give,
    else the one the checkpoint recorded, else ImageNet's at 224. --eval-limit keeps a subset of the test split."""
    import repq
    from repq.data.datasets import STREAMED
    from repq.data.transforms import ImageTransform

    spec = spec or args.data
    kind = spec.partition(":")[0]
    given = [f"--{f.replace('_', '-')}" for f in _STREAM_FLAGS if getattr(args, f, None) not in (None, False)]
    if kind not in STREAMED:
        if given:
            raise RepqError(f"{', '.join(given)} {'apply' if len(given) > 1 else 'applies'} to imagefolder and "
                            f"filelist data only; drop {'them' if len(given) > 1 else 'it'} for --data {spec}")
        data = repq.load_dataset(spec, split)
    else:
        recorded = (payload or {}).get("data_meta") or {}
        if recorded.get("name") != kind:
            recorded = {}
        size = args.image_size or (recorded.get("input_size") or [224])[-1]
        stored = recorded.get("transform") or {}
        base = ImageTransform()
        try:
            transform = ImageTransform(
                size=size, crop_pct=args.crop_pct or stored.get("crop_pct", base.crop_pct),
                interpolation=args.interpolation or stored.get("interpolation", base.interpolation),
                mean=tuple(args.mean or recorded.get("mean") or base.mean),
                std=tuple(args.std or recorded.get("std") or base.std))
        except ValueError as exc:
            raise RepqError(f"--mean / --std / --crop-pct: {exc}") from None
        data = repq.load_dataset(spec, split, transform=transform, workers=args.workers,
                                 skip_corrupt=args.skip_corrupt)
        _LOADED.append(data)
    if getattr(args, "batch_size", 0) is None:   # evaluation batch: 224x224 activations are 49x 32x32 ones
        args.batch_size = 64 if kind in STREAMED else 256
    if split == "test" and args.eval_limit:
        data = data.subset(args.eval_limit)
    return data


# ---------------------------------------------------------------- commands
_OABN_OPTIONS = ("oabn_branches", "oabn_rule", "oabn_tau", "oabn_k")


def _build_model(name: str, **kwargs: Any):
    """create_model with one-line errors for arguments the model cannot take (e.g. a width that leaves no channel)."""
    import repq
    try:
        return repq.create_model(name, **kwargs)
    except (ValueError, TypeError) as exc:
        raise RepqError(f"--model {name} cannot be built with these options: {exc}") from None


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    import repq
    from repq.checkpoint import read_checkpoint

    check_input_file(args.resume, "--resume")
    check_output_file(args.out, "--out", (args.resume,), args.overwrite)
    device = resolve_device(args.device, amp=args.amp)
    given = [f"--{o.replace('_', '-')}" for o in _OABN_OPTIONS if getattr(args, o) is not None]
    if given and not args.oabn:
        raise RepqError(f"{', '.join(given)} {'configure' if len(given) > 1 else 'configures'} OABN; add --oabn, "
                        "or drop the option")
    extra = {}
    if args.oabn:
        defaults = {"oabn_branches": "identity", "oabn_rule": "fixed", "oabn_tau": 1.0, "oabn_k": 1.0}
        opts = {o: getattr(args, o) if getattr(args, o) is not None else defaults[o] for o in _OABN_OPTIONS}
        extra["oabn"] = {"branches": opts["oabn_branches"], "rule": opts["oabn_rule"], "tau": opts["oabn_tau"],
                         "k": opts["oabn_k"]}
    detect = cli_detect.task_of(args, model_name=args.model) == "detect"
    args.lr = args.lr if args.lr is not None else (0.02 if detect else 0.1)
    args.batch_size = args.batch_size or (32 if detect else 128)
    args.weight_decay = args.weight_decay if args.weight_decay is not None else (5e-4 if detect else 1e-4)
    if not detect:
        with torch.device("meta"):   # the options are checked on a model that allocates nothing
            _build_model(args.model, num_classes=2, in_chans=1, small_input=args.small_input,
                         width_scale=args.width_scale, **extra)
    if args.resume:
        done = (read_checkpoint(args.resume).get("train_state") or {}).get("epoch")
        if done is not None and done >= args.epochs:
            raise RepqError(f"--resume {args.resume} already has {done} epochs; give --epochs above {done} to "
                            "train further")
    if detect:
        out = cli_detect.train(args, extra, device)
        if out:
            _emit(args, out["result"], out["human"])
        return
    train_ds = _load_data(args, "train")
    test_ds = _load_data(args, "test")
    torch.manual_seed(args.seed)  # the initialization is part of the seeded run
    model = _build_model(args.model, num_classes=train_ds.num_classes, in_chans=train_ds.in_chans,
                         small_input=args.small_input, width_scale=args.width_scale, **extra).to(device)
    config = repq.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
                              warmup_epochs=args.warmup_epochs, augment=not args.no_augment, seed=args.seed,
                              max_steps_per_epoch=args.max_steps, amp=args.amp)
    history = repq.train(model, train_ds, config, eval_data=test_ds, out=args.out, resume=args.resume,
                         progress=not args.json,
                         checkpoint_extra={"data": args.data, "data_meta": data_meta(train_ds)})
    from repq.training import distributed_context
    if distributed_context(device)[0] != 0:
        return
    example = test_ds.head(2)[0].to(device)
    fused = repq.evaluate(repq.reparameterize(model, example), test_ds)
    rows = [[e["epoch"], e["train_top1"], e.get("eval_top1", float("nan")), f"{e['images_per_s']:.0f}"]
            for e in history["epochs"]]
    human = format_table(["epoch", "train top-1", "test top-1", "images/s"], rows)
    human += f"\n\nfused model test top-1: {fused['top1']:.2f}   checkpoint: {args.out}"
    human += f"\nnext: repq ptq --checkpoint {args.out} --data {args.data} --out <int8.pt>"
    _emit(args, {"command": "train", "checkpoint": args.out, "epochs": history["epochs"],
                 "loss": history["loss"][-1] if history["loss"] else None, "fused": fused,
                 "seconds": history["seconds"]}, human)


def _ptq_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    weights = [_norm_method(w) for w in args.weight.split(",")]
    acts = [_norm_method(a) for a in args.activation.split(",")]
    try:
        w_bits = [int(b) for b in str(args.w_bits).split(",")]
        a_bits = [int(b) for b in str(args.a_bits).split(",")]
    except ValueError:
        raise RepqError(f"--w-bits and --a-bits take integers (comma lists with --compare), got "
                        f"'{args.w_bits}' and '{args.a_bits}'") from None
    grans = args.granularity.split(",")
    grid = list(itertools.product(weights, grans, acts, w_bits, a_bits))
    if len(grid) > 1 and not args.compare:
        raise RepqError("several methods or bit-widths were given; add --compare to run them as a grid")
    return [dict(weight=w, weight_granularity=g, activation=a, w_bits=wb, a_bits=ab)
            for w, g, a, wb, ab in grid]


def _cfws_deploy(args: argparse.Namespace, weight: str) -> str:
    """--cfws-deploy for one run: in a --compare grid it applies to the CFWS weight methods only."""
    deploy = args.cfws_deploy.replace("-", "_")
    return "exact" if args.compare and not weight.startswith("cfws") else deploy


def _ptq_config(args: argparse.Namespace, options: dict[str, Any]):
    import repq

    config = repq.PTQConfig(num_samples=args.calib, seed=args.seed, sequential=args.sequential,
                            unsigned_activations=not args.signed_activations, quantize_pool=args.quantize_pool,
                            bias_correction=not args.no_bias_correction, equalize=not args.no_equalize,
                            input_activation=(args.input_activation
                                              or ("minmax" if args.signed_activations else "affine")).replace("-", "_"),
                            skip_layers=tuple(n.strip() for n in args.skip_layers.split(",") if n.strip()),
                            cfws_deploy=_cfws_deploy(args, options["weight"]), edge_bits=args.edge_bits or None,
                            one_conv_fallback=not args.no_one_conv_fallback, reduce_range=args.reduce_range,
                            **options)
    try:
        config.validate()
    except RepqError as err:   # name the flag, not the Python field
        for field, flag in (("reduce_range", "--reduce-range"), ("edge_bits", "--edge-bits"), ("w_bits", "--w-bits"),
                            ("a_bits", "--a-bits"), ("num_samples", "--calib"),
                            ("input_activation", "--input-activation"),
                            ("activation method", "--activation"), ("weight method", "--weight"),
                            ("weight_granularity", "--granularity"), ("skip_layers", "--skip-layers"),
                            ("cfws_deploy", "--cfws-deploy")):
            if field in str(err):
                raise RepqError(f"{flag}: {err}") from None
        raise
    return config


def _calibration_mode(config) -> str:
    if config.activation == "auto":
        return "auto (float inputs, consumer-output scoring" + (", guarded)" if config.guard else ")")
    return "sequential (quantized inputs)" if config.sequential else "float inputs"


def _layer_report(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per quantized layer and pool: the calibrator its input got, its range, a guard fallback, and for a
    CFWS layer deployed in two branches (--cfws-deploy two-branch / residual) the form it kept."""
    from repq.ptq import input_ranges

    choices = (meta.get("auto") or {}).get("choices", {})
    ranges = input_ranges(meta)
    rows = []
    for name, spec in {**meta["layers"], **meta.get("pools", {})}.items():
        rows.append({"layer": name, "calibrator": spec.get("calibrator", ""), "amax": ranges[name],
                     "signed": spec["input_signed"], "zero_point": spec.get("input_zero_point", 0),
                     "guard_fallback": bool(choices.get(name, {}).get("guard_fallback", False)),
                     "cfws_form": spec.get("branch_errors", {}).get("deployed")})
    return rows


def _format_layer_report(result: dict[str, Any]) -> str:
    rows = [[r["layer"], r["calibrator"] + (" (guard)" if r["guard_fallback"] else ""), f"{r['amax']:.4g}",
             "int" if r["signed"] else "uint" + (f", zero point {r['zero_point']}" if r.get("zero_point") else "")]
            for r in result["layers"]]
    headers = ["layer", "calibrator", "range", "codes"]
    if any(r.get("cfws_form") for r in result["layers"]):
        forms = {"single_conv": "one min-max conv", "two_branch": "two branches", "residual": "two branches"}
        headers.append("CFWS deployed as")
        for row, r in zip(rows, result["layers"]):
            row.append(forms.get(r.get("cfws_form"), ""))
    text = format_table(headers, rows)
    guard = result.get("guard")
    if guard:
        text += (f"\nguard: output MSE on held-out calibration images {guard['final_error']:.4g}; "
                 f"per-channel min-max + percentile {guard['baseline_error']:.4g}, percentile ranges "
                 f"{guard['percentile_error']:.4g}; {len(guard['fallbacks'])} layer(s) fell back")
        if guard["worse_than_baseline"]:
            text += "; still worse than the min-max + percentile baseline"
    return text


def cmd_ptq(args: argparse.Namespace) -> None:
    import repq

    check_input_file(args.checkpoint, "--checkpoint")
    check_output_file(args.out, "--out", (args.checkpoint,), args.overwrite)
    grid = _ptq_grid(args)                   # every option checked before any data is loaded
    configs = [_ptq_config(args, options) for options in grid]
    if args.out and len(grid) > 1:
        raise RepqError("--out saves one quantized model; drop --compare or give one method per option")
    if args.timm and args.out:
        raise RepqError("--out saves repq models only; for a timm model use the Python API or drop --out")
    device = resolve_device(args.device)
    payload: dict[str, Any] = {}
    if not args.timm:
        model, payload = repq.load_checkpoint(args.checkpoint)
        model = model.to(device)
        if payload.get("quant"):
            raise RepqError(f"{args.checkpoint} is already quantized; pass the float checkpoint from `repq train`")
        if cli_detect.task_of(args, payload["model"]) == "detect":
            out = cli_detect.ptq(args, model, payload, grid, configs, device)
            _emit(args, out["result"], out["human"])
            return
    elif cli_detect.task_of(args) == "detect":
        raise RepqError("--timm builds classifiers; detectors come from `repq train --model yolov6_n`")
    if args.sensitivity or args.keep_sensitive:
        raise RepqError("--sensitivity and --keep-sensitive rank layers by mAP; they apply to detectors (for "
                        "classifiers, keep layers in float with --skip-layers)")
    train_ds = _load_data(args, "train", payload)
    test_ds = _load_data(args, "test", payload)
    if args.timm:
        model = _timm_model(args.timm, args.checkpoint, train_ds).to(device)
    else:
        _check_data(payload, train_ds, args.allow_data_mismatch)
    if args.calib > len(train_ds):
        print(f"note: --calib {args.calib}: the train split has {len(train_ds)} images; calibrating on all of them",
              file=sys.stderr)
    if configs[0].skip_layers:   # names refer to the fused model: check them before the evaluation and the grid
        from repq.ptq import resolve_skip_layers
        try:
            resolve_skip_layers(repq.reparameterize(model, train_ds.calibration_images(2).to(device)),
                                configs[0].skip_layers)
        except RepqError as err:
            raise RepqError(f"--skip-layers: {str(err).removeprefix('skip_layers: ')}") from None
    fp = repq.evaluate(model, test_ds, batch_size=args.batch_size)
    results, last = [], None
    runs = zip(grid, configs)
    if len(grid) > 1 and not args.json:
        from tqdm import tqdm
        runs = tqdm(list(runs), desc="ptq grid", unit="run", leave=False, disable=None)
    try:
        for options, config in runs:
            calib = train_ds.calibration_images(config.num_samples, config.seed)
            start = time.perf_counter()
            with warnings.catch_warnings():   # the count actually used is reported below
                warnings.filterwarnings("ignore", message="calibration data has")
                qmodel = repq.quantize(model, calib, config)
            seconds = time.perf_counter() - start
            metrics = repq.evaluate(qmodel, test_ds, batch_size=args.batch_size)
            results.append({**options, "top1": metrics["top1"], "top5": metrics["top5"],
                            "drop": fp["top1"] - metrics["top1"], "ptq_seconds": seconds,
                            "calibration": {"images": qmodel.repq_quant["calibration_images"], "seed": config.seed,
                                            "mode": _calibration_mode(config)},
                            "layers": _layer_report(qmodel.repq_quant),
                            "float_layers": qmodel.repq_quant["float_layers"],
                            "edge_bits": config.edge_bits, "edges": qmodel.repq_quant.get("edges"),
                            "fusion": qmodel.repq_quant["fusion"],
                            "equalization": _equalization_summary(qmodel.repq_quant.get("equalization")),
                            "cfws_deploy": config.cfws_deploy, "reduce_range": config.reduce_range,
                            "two_branch_check": qmodel.repq_quant.get("two_branch_check"),
                            "guard": (qmodel.repq_quant.get("auto") or {}).get("guard")})
            last = qmodel
    except KeyboardInterrupt:
        if not results:
            raise
        print(f"interrupted after {len(results)} of {len(grid)} runs; the finished ones:", file=sys.stderr)
        args.out = None   # a partial grid saves no model
        _emit(args, {"command": "ptq", "fp": fp, "results": results, "interrupted": True},
              _ptq_table(fp, results))
        raise
    if args.out:
        repq.save_checkpoint(args.out, last, source=str(args.checkpoint), data=args.data,
                             data_meta=data_meta(train_ds), metrics={"fp": fp, "quantized": results[0]})
    human = _ptq_table(fp, results)
    if len(results) == 1:
        human += "\n\nper-layer activation calibrator:\n" + _format_layer_report(results[0])
    fusion = results[0]["fusion"]
    human += (f"\nfusion: {sum(fusion['blocks'].values())} block(s) "
              f"({', '.join(f'{n} {k}' for k, n in fusion['blocks'].items()) or 'none'}), "
              f"{fusion['conv_bn_folded']} conv+BN fold(s), verified against the original"
              + (f" (relative difference {fusion['relative_diff']:.2g})" if fusion["relative_diff"] is not None
                 else ""))
    human += "\nactivation equalization: " + results[0]["equalization"]["text"]
    for r in results:
        check = r["two_branch_check"]
        if check:
            kept = check.get("one_conv_layers", [])
            human += (f"\n{r['cfws_deploy']} CFWS: {check.get('two_branch_layers', '?')} layer(s) as two branches, "
                      f"{len(kept)} as one min-max conv (it reconstructed their output better)"
                      + (f": {', '.join(kept)}" if kept else ""))
            human += (f"\n{r['cfws_deploy']} CFWS check: network output error {check['error']:.3g} on the calibration "
                      f"images, per-channel min-max INT8 {check['baseline_error']:.3g}"
                      + (": WORSE than the plain INT8 model; check the accuracy above before deploying, or use "
                         "--cfws-deploy exact" if check["worse_than_baseline"] else ""))
    if results[0]["reduce_range"]:
        human += ("\n--reduce-range: every integer layer has 7-bit weights (codes within +-63): exact in ONNX "
                  "Runtime's default u8 x s8 kernels on any x64 CPU")
    human += "\nkept in float: " + (", ".join(results[0]["float_layers"]) or "nothing")
    if results[0]["edges"]:
        edges = results[0]["edges"]
        human += (f"\nat {results[0]['edge_bits']} bits (--edge-bits): "
                  + ", ".join(dict.fromkeys(edges["input"] + edges["output"])))
    if args.out:
        human += (f"\nquantized checkpoint: {args.out}\nnext: repq export --checkpoint {args.out} --onnx "
                  f"<model.onnx> --data {args.data} --verify")
    _emit(args, {"command": "ptq", "fp": fp, "results": results, "checkpoint": args.out}, human)


def _equalization_summary(record: dict[str, Any] | None) -> dict[str, Any]:
    """What activation equalization did, for the report: the pairs rescaled, or why none was."""
    record = record or {"pairs": {}, "skipped": "not recorded"}
    pairs = record["pairs"]
    if not pairs:
        text = f"none ({record['skipped']})"
    elif not record.get("kept", True):
        text = (f"dropped: {len(pairs)} conv pair(s) were rescaled, but the guard found the network output closer "
                "to float without it")
    else:
        scaled = sum(p["scaled_channels"] for p in pairs.values())
        total = sum(p["channels"] for p in pairs.values())
        text = (f"{len(pairs)} conv pair(s), {scaled} of {total} channels rescaled "
                f"(largest scale {max(p['max_scale'] for p in pairs.values()):.3g})")
    return {"pairs": len(pairs), "kept": bool(pairs) and record.get("kept", True), "text": text}


def _ptq_table(fp: dict[str, Any], results: list[dict[str, Any]]) -> str:
    rows = [[r["weight"], r["weight_granularity"], r["activation"],
             f"W{r['w_bits']}A{r['a_bits']}" + (f", edges {r['edge_bits']}" if r.get("edges") else "")
             + (", weights <= 7 bits" if r.get("reduce_range") else ""), r["top1"],
             r["drop"], f"{r['ptq_seconds']:.1f}"] for r in results]
    calibration = results[0]["calibration"]
    return (f"FP top-1 {fp['top1']:.2f} ({fp['n']} test images, {calibration['images']} calibration images, seed "
            f"{calibration['seed']}, {calibration['mode']})\n"
            + format_table(["weight", "granularity", "activation", "bits", "top-1", "drop", "PTQ s"], rows))


def cmd_qat(args: argparse.Namespace) -> None:
    import repq
    from repq.training import distributed_context

    check_input_file(args.checkpoint, "--checkpoint")
    check_output_file(args.out, "--out", (args.checkpoint,), args.overwrite)
    cluster_only = [f"--{o.replace('_', '-')}" for o in ("codebook", "refit_every", "lloyd_iters", "codebook_grid",
                                                              "codebook_scale")
                    if getattr(args, o) is not None]
    if args.method != "cluster" and cluster_only:
        raise RepqError(f"{', '.join(cluster_only)} {'apply' if len(cluster_only) > 1 else 'applies'} to --method "
                        f"cluster only; drop it for --method {args.method}")
    cluster_defaults = {"codebook": "refit", "refit_every": 100, "lloyd_iters": 3, "codebook_grid": "free",
                        "codebook_scale": "layer"}
    options = {o: getattr(args, o) if getattr(args, o) is not None else d for o, d in cluster_defaults.items()}
    config = repq.QATConfig(method=args.method, w_bits=args.w_bits, a_bits=args.a_bits,
                            edge_bits=args.edge_bits or None, num_samples=args.calib, seed=args.seed,
                            quantize_pool=args.quantize_pool, affine_activations=args.affine_activations,
                            reduce_range=args.reduce_range, **options)
    try:
        config.validate()
    except RepqError as err:
        if "reduce_range" in str(err):   # name the flags, not the Python fields
            raise RepqError("--reduce-range narrows integer weight codes, and a free codebook deploys as float "
                            "convs: add --codebook-grid int8 (or use --method lsq)") from None
        raise RepqError(f"{err} (check --w-bits, --a-bits, --edge-bits)") from None
    device = resolve_device(args.device, amp=args.amp)
    model, payload = repq.load_checkpoint(args.checkpoint)
    if payload.get("quant"):
        raise RepqError(f"{args.checkpoint} is already quantized; pass the float checkpoint from `repq train`")
    model = model.to(device)
    if cli_detect.task_of(args, payload["model"]) == "detect":
        out = cli_detect.qat(args, model, payload, config, device)
        if out:
            _emit(args, out["result"], out["human"])
        return
    if args.distill:
        raise RepqError("--distill applies to detectors (the distillation of their dense predictions); drop it for "
                        "a classifier")
    train_ds = _load_data(args, "train", payload)
    test_ds = _load_data(args, "test", payload)
    _check_data(payload, train_ds, args.allow_data_mismatch)
    rank = distributed_context(device)[0]
    qat_model = repq.prepare_qat(model, config,
                                 train_ds.calibration_images(config.num_samples, config.seed).to(device))
    rows = []
    if rank == 0:
        fused = repq.reparameterize(model, test_ds.head(2)[0].to(device))
        rows.append(["FP (fused)", repq.evaluate(fused, test_ds)])
        rows.append(["PTQ start (QAT initialization)", repq.evaluate(qat_model, test_ds)])
    train_config = repq.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                    warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay,
                                    augment=not args.no_augment, seed=args.seed,
                                    max_steps_per_epoch=args.max_steps, amp=args.amp)
    history = repq.train(qat_model, train_ds, train_config, eval_data=test_ds, progress=not args.json)
    qmodel = repq.convert_qat(qat_model)
    if rank != 0:
        return
    rows.append([f"QAT {args.method} W{args.w_bits}A{args.a_bits}"
                 + (", weights <= 7 bits" if config.reduce_range else ""), repq.evaluate(qmodel, test_ds)])
    metrics = {"fp": rows[0][1], "start": rows[1][1], "qat": rows[2][1]}
    repq.save_checkpoint(args.out, qmodel, source=str(args.checkpoint), data=args.data, metrics=metrics,
                         history=history, data_meta=data_meta(train_ds))
    human = format_table(["model", "top-1", "top-5"], [[name, m["top1"], m["top5"]] for name, m in rows])
    human += (f"\n\n{len(history['epochs'])} epochs, {history['seconds'] / 60:.1f} min; "
              f"quantized checkpoint: {args.out}\nnext: repq export --checkpoint {args.out} --onnx <model.onnx> "
              f"--data {args.data} --verify")
    _emit(args, {"command": "qat", "checkpoint": args.out, "config": vars(config), **metrics,
                 "epochs": history["epochs"], "seconds": history["seconds"]}, human)


def _timm_model(name: str, weights: str, data):
    """A timm model with the user's weights (read without running code); its blocks fuse through the adapters."""
    try:
        import timm
    except ImportError:
        raise RepqError("--timm needs timm: pip install timm (it also installs torchvision)") from None
    from repq.foreign import read_state_dict
    try:
        model = timm.create_model(name, pretrained=False, num_classes=data.num_classes, in_chans=data.in_chans)
    except RuntimeError as exc:  # timm's error for an unknown name
        raise RepqError(f"timm cannot build '{name}': {str(exc).splitlines()[0]}") from None
    try:
        model.load_state_dict(read_state_dict(weights))
    except RuntimeError:
        raise RepqError(f"{weights} does not fit timm's {name} with {data.num_classes} classes and "
                        f"{data.in_chans} input channels; check the model name and the data") from None
    return model.eval()


def _ort_eval(model, test_ds, allow_float: bool, batch_size: int, progress: bool) -> dict[str, Any]:
    """Top-1/top-5 and images/s of the model exported to ONNX and run by ONNX Runtime (integer kernels)."""
    import tempfile

    import repq
    from repq.export import OnnxRuntimeModel, export_onnx
    with tempfile.TemporaryDirectory(prefix="repq-eval-") as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", test_ds.head(1)[0], allow_float=allow_float)
        return repq.evaluate(OnnxRuntimeModel(path), test_ds, batch_size=batch_size, progress=progress)


def cmd_eval(args: argparse.Namespace) -> None:
    import repq

    check_input_file(args.checkpoint, "--checkpoint")
    device = resolve_device(args.device)
    model, payload = repq.load_checkpoint(args.checkpoint)
    model = model.to(device)
    if cli_detect.task_of(args, payload["model"]) == "detect":
        if args.min_top1 is not None:
            raise RepqError("--min-top1 gates classifiers; for a detector use --min-map")
        out = cli_detect.evaluate(args, model, payload, device)
        _emit(args, out["result"], out["human"])
        if args.min_map is not None and not out["gate"] >= args.min_map:
            raise CheckFailed(f"--min-map: mAP@0.5:0.95 {out['gate']:.2f} is below {args.min_map:.2f}")
        return
    if args.min_map is not None:
        raise RepqError("--min-map gates detectors; for a classifier use --min-top1")
    test_ds = _load_data(args, "test", payload)
    _check_data(payload, test_ds, args.allow_data_mismatch)
    progress = not args.json
    rows = {payload["kind"]: repq.evaluate(model, test_ds, args.batch_size, progress)}
    deploy = model
    if payload["kind"] == "train":
        deploy = repq.reparameterize(model, test_ds.head(2)[0].to(device))
        rows["fused"] = repq.evaluate(deploy, test_ds, args.batch_size, progress)
    if args.runtime == "ort":   # the deployed form, run by ONNX Runtime beside repq's own forward
        rows[f"{'fused' if payload['kind'] == 'train' else payload['kind']} in ONNX Runtime"] = _ort_eval(
            deploy.cpu(), test_ds, allow_float=not payload.get("quant"), batch_size=args.batch_size,
            progress=progress)
    human = format_table(["model", "top-1", "top-5", "images", "model images/s", "with data images/s"],
                         [[k, v["top1"], v["top5"], v["n"], f"{v['images_per_s']:.1f}",
                           f"{v['n'] / max(v['seconds'], 1e-9):.1f}"] for k, v in rows.items()])
    human += (f"\nbatch {args.batch_size}; model images/s counts the forward passes only, with data adds waiting "
              "for decoded images")
    _emit(args, {"command": "eval", "checkpoint": args.checkpoint, "results": rows}, human)
    gate = rows[next(k for k in rows if "ONNX" in k)] if args.runtime == "ort" else rows[payload["kind"]]
    if args.min_top1 is not None and not gate["top1"] >= args.min_top1:
        raise CheckFailed(f"--min-top1: top-1 {gate['top1']:.2f} is below {args.min_top1:.2f}")


def _reduce_range_remedy(quant: dict) -> str:
    """The command that gives this quantized checkpoint 7-bit weights again: its own kind of quantization."""
    if quant.get("qat"):
        return ("repq qat --reduce-range" + (" --codebook-grid int8" if quant["qat"].get("method") == "cluster" else ""))
    return "repq ptq --reduce-range"


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    import repq
    from repq.export import export_onnx, integer_kernels, verify_against_simulation
    from repq.export.onnx_qdq import codebook_path
    from repq.export.verify import ORT_EXACT_U8S8, U8S8_EXACT_LIMIT, largest_weight_code

    check_input_file(args.checkpoint, "--checkpoint")
    check_output_file(args.onnx, "--onnx", (args.checkpoint,), args.overwrite)
    model, payload = repq.load_checkpoint(args.checkpoint)
    quant = payload.get("quant") or {}
    data_spec = args.data or payload.get("data")
    if args.verify and not data_spec:
        raise RepqError("--verify needs --data (the evaluation images; the checkpoint records none)")
    if args.fp and quant:
        raise RepqError(f"--fp exports a float model but {args.checkpoint} is quantized; pass the float checkpoint "
                        "(from `repq train`), or drop --fp")
    if not args.fp and not quant:
        raise RepqError(f"{args.checkpoint} is not quantized; run `repq ptq ... --out` first, or add --fp")
    if args.bench and args.fp:
        raise RepqError("--bench compares a quantized model with its FP32 twin; drop --fp (or --bench)")
    test_ds = None
    detect = cli_detect.task_of(args, payload["model"]) == "detect"
    if data_spec and detect:
        test_ds = cli_detect.load_detection_data(args, "test", payload, data_spec)
        cli_detect.check_detection_data(payload, test_ds, args.allow_data_mismatch)
        example = test_ds.head(1)[0]
    elif data_spec:
        test_ds = _load_data(args, "test", payload, data_spec)
        _check_data(payload, test_ds, args.allow_data_mismatch)
        example = test_ds.head(1)[0]
    elif quant.get("input_shape"):
        example = torch.zeros(1, *quant["input_shape"])
    else:
        raise RepqError("give --data so that repq knows the input size of the model")
    if args.fp:
        model = repq.reparameterize(model, example.expand(2, *example.shape[1:]))
    target = Path(args.onnx)
    staging = target.with_name(f".{target.stem}.partial{target.suffix or '.onnx'}")  # moved in place when done
    try:
        metadata = {"repq_data": payload["data_meta"]} if payload.get("data_meta") else None
        path = export_onnx(model, staging, example, allow_float=args.fp, metadata=metadata)
        result: dict[str, Any] = {"command": "export", "onnx": str(target), "bytes": path.stat().st_size,
                                  "kernels": integer_kernels(path), "largest_weight_code": largest_weight_code(path)}
        human = f"wrote {target} ({path.stat().st_size / 1e6:.2f} MB)\nONNX Runtime kernels: {result['kernels']}"
        if codebook_path(staging).exists():
            human += (f"\nClusterQAT indices + codebooks: {codebook_path(target)} (ONNX Runtime runs these layers "
                      "as float convs on the looked-up weights)")
        if result["kernels"].get("ConvInteger"):
            human += ("\nnote: ConvInteger convs (exact CFWS layers, or outputs that are not requantized) run the "
                      "simulation's integer arithmetic but slower than QLinearConv in ONNX Runtime; `repq ptq "
                      "--cfws-deploy two-branch --quantize-pool` fuses every conv (docs/results/cfws_deploy.md)")
        failure = None
        if args.verify and detect:
            v = result["verify"] = cli_detect.verify(model, path, test_ds, args.batch_size, progress=not args.json)
            human += ("\n" + format_table(["runtime", "mAP@0.5:0.95", "mAP@0.5"],
                                          [["repq simulation", v["map_repq"], v["map50_repq"]],
                                           ["ONNX Runtime", v["map_onnxruntime"], v["map50_onnxruntime"]]])
                      + f"\nmax |output difference| {v['max_output_diff']:.4g} (outputs up to "
                      f"{v['output_scale']:.3g}) on the first {v['compared_images']} of {v['n']} images")
            failure = cli_detect.verify_failure(v, args.max_map_diff)
        elif args.verify:
            v = result["verify"] = verify_against_simulation(model, path, test_ds, batch_size=args.batch_size,
                                                             progress=not args.json)
            human += ("\n" + format_table(["runtime", "top-1"], [["repq simulation", v["top1_repq"]],
                                                                 ["ONNX Runtime", v["top1_onnxruntime"]]])
                      + f"\nmax |logit difference| {v['max_logit_diff']:.4g} (logits up to {v['logit_scale']:.3g}), "
                      f"same prediction on {v['argmax_agreement']:.2f}% of {v['n']} images")
            failure = _verify_failure(v, args.min_agreement)
        if failure:
            result["verify"]["passed"] = False
            if not args.json:
                _emit(args, result, human)
            raise CheckFailed(f"--verify failed: {failure}; {target} was not written")
        if args.verify:
            result["verify"]["passed"] = True
        os.replace(path, target)
        if codebook_path(staging).exists():
            os.replace(codebook_path(staging), codebook_path(target))
    finally:
        staging.unlink(missing_ok=True)
        codebook_path(staging).unlink(missing_ok=True)
    if args.bench:
        from repq.export.bench import bench
        b = result["bench"] = bench(model, target, example, seconds=args.bench_seconds)
        timed = b["layer_ms"]
        human += "\n\n" + format_table(
            ["layer", "ONNX Runtime kernel", f"ms per batch of {timed['batch']}"],
            [[n, b["layers"].get(n, "-"), f"{t:.3f}"] for n, t in timed["layers"].items()])
        human += "\n" + format_table(
            ["batch", "this model images/s", "FP32 twin images/s", "speed-up"],
            [[batch, f"{v['model']:.1f}", f"{v['fp32']:.1f}", f"{v['ratio']:.2f}x"]
             for batch, v in b["images_per_s"].items()])
        human += (f"\nkernels: {', '.join(f'{n} {k}' for k, n in b['kernel_counts'].items())}; FP32 twin: the same "
                  f"network with the dequantized weights, float; ONNX Runtime CPU, {os.cpu_count()} cores"
                  f", session option {ORT_EXACT_U8S8[0]}={ORT_EXACT_U8S8[1]}"
                  + (f" (on CPUs without VNNI, ONNX Runtime runs the layers with weight codes beyond "
                     f"+-{U8S8_EXACT_LIMIT} on slower exact kernels; `{_reduce_range_remedy(quant)}` avoids that)"
                     if b["largest_weight_code"] > U8S8_EXACT_LIMIT else ""))
    human += (f"\nnext: run it with onnxruntime.InferenceSession('{target}') (input 'input', NCHW float32, "
              "normalized as the training data)")
    if result["largest_weight_code"] > U8S8_EXACT_LIMIT:
        human += (f"; its int8 weight codes reach +-{result['largest_weight_code']}: on x64 CPUs without VNNI set "
                  f"the session option {ORT_EXACT_U8S8[0]}={ORT_EXACT_U8S8[1]} (exact, slower there), or its int8 "
                  f"convs may saturate; `{_reduce_range_remedy(quant)}` keeps the codes within +-63, exact at full "
                  "speed")
    elif result["largest_weight_code"]:
        human += (f"; its int8 weight codes stay within +-{result['largest_weight_code']}: exact in ONNX Runtime's "
                  "default kernels on any x64 CPU")
    _emit(args, result, human)


def _verify_failure(v: dict[str, Any], min_agreement: float) -> str | None:
    """Why ONNX Runtime and the simulation disagree too much, or None when they agree."""
    numbers = [v["max_logit_diff"], v["logit_scale"], v["top1_repq"], v["top1_onnxruntime"]]
    if not all(x == x and abs(x) != float("inf") for x in numbers):
        return "the logits are NaN or infinite (a corrupt scale in the checkpoint?)"
    if v["argmax_agreement"] < min_agreement:
        return (f"ONNX Runtime and repq's simulation agree on {v['argmax_agreement']:.2f}% of images "
                f"(--min-agreement {min_agreement:g})")
    return None


def cmd_analyze(args: argparse.Namespace) -> None:
    import repq
    from repq.analysis import analyze

    check_input_file(args.checkpoint, "--checkpoint")
    check_output_folder(args.out, "--out", args.overwrite)
    device = resolve_device(args.device)
    model, payload = repq.load_checkpoint(args.checkpoint)
    model = model.to(device)
    data_spec = args.data or payload.get("data")
    if not data_spec:
        raise RepqError("give --data: the analysis runs the model on calibration images")
    detect = cli_detect.task_of(args, payload["model"]) == "detect"
    if detect:
        train_ds = cli_detect.load_detection_data(args, "train", payload, data_spec)
        cli_detect.check_detection_data(payload, train_ds, args.allow_data_mismatch)
    else:
        train_ds = _load_data(args, "train", payload, data_spec)
        _check_data(payload, train_ds, args.allow_data_mismatch)
    images = train_ds.calibration_images(args.calib, args.seed).to(device)
    eval_data = None
    if detect and not args.no_clipping:
        print("note: the clipping sensitivity measures top-1; for a detector it is skipped (rank layers by mAP "
              "with `repq ptq --sensitivity`)", file=sys.stderr)
    elif not args.no_clipping:
        args.eval_limit = args.eval_limit or 1000
        eval_data = _load_data(args, "test", payload, data_spec)
    result = analyze(model, images, args.out, eval_data=eval_data, bits=args.bits, progress=not args.json)
    human = "\n".join(result["findings"]) or "no layer has center taps over 10x its surround"
    human += f"\n\nreport: {Path(args.out) / 'report.md'} ({len(result['files'])} files); open it for the plots"
    _emit(args, {"command": "analyze", **result}, human)


def cmd_import(args: argparse.Namespace) -> None:
    import repq
    from repq.foreign import load_foreign_weights

    check_input_file(args.weights, "--weights")
    check_output_file(args.out, "--out", (args.weights,), args.overwrite)
    model = _build_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans,
                         small_input=args.small_input, deploy=args.deploy)
    load_foreign_weights(model, args.weights, args.layout)
    repq.save_checkpoint(args.out, model, source=str(args.weights))
    _emit(args, {"command": "import", "checkpoint": args.out, "model": model.repq_config},
          f"wrote {args.out}: {args.model} (num_classes={args.num_classes}) from {args.weights}\n"
          f"next: repq ptq --checkpoint {args.out} --data <your data> --out <int8.pt>")


def cmd_demo(args: argparse.Namespace) -> None:
    from repq.demo import run_demo

    check_output_folder(args.out, "--out", args.overwrite)
    result, human = run_demo(args.out, data=args.data, epochs=args.epochs, seed=args.seed, progress=not args.json)
    _emit(args, result, human)


# ---------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, writes: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of tables")
    if writes:
        p.add_argument("--overwrite", action="store_true", help="replace an existing output file or folder")


def _data_args(p: argparse.ArgumentParser, required: bool = True, eval_batch: bool = True) -> None:
    p.add_argument("--data", required=required,
                   help="fashion-mnist[:FOLDER] | digits | mnist[:FOLDER] | cifar10:PATH (in memory) | "
                        "imagefolder:PATH (train/, val/) | filelist:PATH (train.txt, val.txt: 'path LABEL' lines) "
                        "(streamed from disk); "
                        "detection: fashion-mnist-det | digits-det (composed scenes) | coco:DIR | yolo:DIR")
    p.add_argument("--task", default="auto", choices=["auto", "classify", "detect"],
                   help="auto: inferred from --data and the model (a detector checkpoint or --model yolov6_*)")
    p.add_argument("--image-size", type=image_size, default=None,
                   help="imagefolder/filelist: model input side (default: what the checkpoint recorded, else 224); "
                        "detection: the letterbox / scene side (default: recorded, else 320 for coco/yolo)")
    p.add_argument("--crop-pct", type=crop_fraction, default=None,
                   help="imagefolder/filelist evaluation: resize the shorter side to image-size / crop-pct, then "
                        "center-crop (default 0.875: 256 -> 224)")
    p.add_argument("--interpolation", default=None, choices=["bilinear", "bicubic", "nearest", "lanczos"],
                   help="imagefolder/filelist resize filter (default bilinear)")
    p.add_argument("--mean", type=channel_values, default=None,
                   help="imagefolder/filelist normalization mean per channel, 0..1 scale (default ImageNet's)")
    p.add_argument("--std", type=channel_values, default=None, help="... and std (default ImageNet's)")
    p.add_argument("--workers", type=nonnegative_int, default=2,
                   help="imagefolder/filelist: image decoding processes (0: decode in the main process)")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="imagefolder/filelist: leave unreadable images out (counted) instead of stopping")
    p.add_argument("--eval-limit", type=positive_int, default=None,
                   help="evaluate on the first N test images only (default: all)")
    p.add_argument("--allow-data-mismatch", action="store_true",
                   help="use data other than what the checkpoint records (name, input size, normalization, classes)")
    if eval_batch:
        p.add_argument("--batch-size", type=positive_int, default=None,
                       help="evaluation batch size (default 256; 64 for imagefolder/filelist data)")


def _device_args(p: argparse.ArgumentParser, amp: bool = False) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda | cuda:N")
    if amp:
        p.add_argument("--amp", default=None, choices=["bf16", "fp16"],
                       help="mixed precision on CUDA (default: float32)")


def _edge_bits(text: str) -> int:
    value = nonnegative_int(text)
    if value and not 2 <= value <= 16:
        raise argparse.ArgumentTypeError(f"must be 0 (same as the rest) or 2 to 16, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from repq import __version__

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = OneLineParser(prog="repq", description="Quantize structurally re-parameterized CNNs (RepVGG).",
                           formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"repq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=fmt)

    p = command("train", "train the multi-branch net (torchrun-ready)")
    p.add_argument("--model", default="repvgg_a0", help="a name from `repq models`")
    _data_args(p, eval_batch=False)
    p.add_argument("--epochs", type=positive_int, default=5)
    p.add_argument("--batch-size", type=positive_int, default=None, help="default 128; detectors 32")
    p.add_argument("--lr", type=positive_float, default=None, help="default 0.1; detectors 0.02")
    p.add_argument("--weight-decay", type=nonnegative_float, default=None, help="default 1e-4; detectors 5e-4")
    p.add_argument("--label-smoothing", type=fraction, default=0.0)
    p.add_argument("--warmup-epochs", type=nonnegative_float, default=0.0)
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--small-input", action="store_true", help="stride-1 stem for 28x28 / 32x32 images")
    p.add_argument("--width-scale", type=positive_float, default=1.0, help="thinner model for small data (e.g. 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=positive_int, default=None, help="cap steps per epoch (smoke runs)")
    p.add_argument("--resume", default=None, help="continue from a checkpoint written by `repq train`")
    p.add_argument("--oabn", action="store_true", help="outlier-aware BN in the blocks (bounds the folded scales)")
    p.add_argument("--oabn-branches", default=None, choices=["identity", "identity+1x1", "all"],
                   help="with --oabn (default identity)")
    p.add_argument("--oabn-rule", default=None, choices=["fixed", "relative", "variance_floor"],
                   help="with --oabn (default fixed). fixed: |t| <= tau; relative: tau = k * max |t3 K3| per "
                        "channel; variance_floor: the fixed bound reached by flooring the variance")
    p.add_argument("--oabn-tau", type=positive_float, default=None, help="with --oabn: bound of the fixed / "
                   "variance_floor rules (default 1.0)")
    p.add_argument("--oabn-k", type=positive_float, default=None, help="with --oabn: factor of the relative rule "
                   "(default 1.0)")
    p.add_argument("--out", required=True, help="checkpoint to write (after every epoch, atomically)")
    _device_args(p, amp=True)
    _common(p)
    p.set_defaults(func=cmd_train)

    p = command("qat", "quantization-aware training: ClusterQAT or LSQ (torchrun-ready)")
    p.add_argument("--checkpoint", required=True, help="a float checkpoint from `repq train` (plain BN or OABN)")
    _data_args(p, eval_batch=False)
    p.add_argument("--method", default="cluster", choices=["cluster", "lsq"])
    p.add_argument("--w-bits", type=bit_width, default=4)
    p.add_argument("--a-bits", type=bit_width, default=4)
    p.add_argument("--codebook", default=None, choices=["refit", "learned"],
                   help="cluster: re-fit the centroids by Lloyd steps, or learn them by gradient (default refit)")
    p.add_argument("--refit-every", type=nonnegative_int, default=None,
                   help="cluster/refit: steps between re-fits, 0: never (default 100)")
    p.add_argument("--codebook-grid", default=None, choices=["free", "int8"],
                   help="cluster: free centroids (deployed as float convs on looked-up weights) or centroids on one "
                        "int8 grid per layer (deployed as fused int8 convs) (default free)")
    p.add_argument("--codebook-scale", default=None, choices=["layer", "channel"],
                   help="cluster: one codebook in weight units per layer, or one of weights divided by their output "
                        "channel's max |w|, deployed with that scale per channel (default layer)")
    p.add_argument("--lloyd-iters", type=positive_int, default=None,
                   help="cluster/refit: Lloyd iterations per re-fit (default 3)")
    p.add_argument("--edge-bits", type=_edge_bits, default=8, help="bits of the input layer and of the output layers "
                   "(the classifier; a detector's prediction convs) (0: as the rest)")
    p.add_argument("--distill", type=nonnegative_float, default=0.0,
                   help="detectors: weight of the distillation from the float model's predictions (0: off)")
    p.add_argument("--epochs", type=positive_int, default=2)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=0.01)
    p.add_argument("--warmup-epochs", type=nonnegative_float, default=0.2,
                   help="linear learning-rate warmup at the start (default 0.2 epoch): the fake-quantized network's "
                        "first gradients are large, and without it lr 0.01 made ClusterQAT diverge on a zoo model "
                        "(docs/methods.md, QAT)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--calib", type=positive_int, default=32, help="images that initialize the activation steps")
    p.add_argument("--quantize-pool", action="store_true",
                   help="also quantize (and train) the global-pool input, so the last conv runs fused in ONNX Runtime")
    p.add_argument("--affine-activations", action="store_true",
                   help="inputs with negative values (SiLU outputs) get unsigned codes with a learned zero point "
                        "(LSQ+) instead of a signed symmetric grid")
    p.add_argument("--reduce-range", action="store_true",
                   help="integer weights within +-63 (LSQ: at most 7 bits; cluster with --codebook-grid int8: a grid "
                        "of max |centroid| / 63), edge layers included, so ONNX Runtime's fast u8 x s8 kernels stay "
                        "exact on x64 CPUs without VNNI (docs/results/saturation.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=positive_int, default=None, help="cap steps per epoch (smoke runs)")
    p.add_argument("--out", required=True, help="quantized checkpoint to write")
    _device_args(p, amp=True)
    _common(p)
    p.set_defaults(func=cmd_qat)

    p = command("ptq", "fuse, calibrate and quantize; compare FP vs quantized")
    p.add_argument("--checkpoint", required=True, help="a repq checkpoint, or with --timm the timm weights file")
    p.add_argument("--timm", default=None, help="build this timm model (needs timm) and load --checkpoint into it")
    _data_args(p)
    p.add_argument("--weight", default="cfws", help="minmax | mse | cfws | cfws-whole (comma list with --compare)")
    p.add_argument("--granularity", default="channel", help="channel | tensor weight scales (comma list)")
    p.add_argument("--activation", default="auto",
                   help="auto (per layer, loss-aware, guarded) | minmax | percentile | mse | kl | improved-kl "
                        "(comma list with --compare)")
    p.add_argument("--w-bits", default="8", help="weight bits (comma list with --compare)")
    p.add_argument("--a-bits", default="8", help="activation bits (comma list with --compare)")
    p.add_argument("--calib", type=positive_int, default=32, help="number of calibration images from the train split")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    p.add_argument("--sequential", action="store_true",
                   help="single methods: calibrate each layer on the quantized output of the layers before it "
                        "(P1's sequencer) instead of float inputs; auto always uses float inputs")
    p.add_argument("--fp-calibration", action="store_true",
                   help="deprecated, no effect: calibration on float inputs is now the default")
    p.add_argument("--no-bias-correction", action="store_true",
                   help="skip the empirical per-channel bias correction (on by default)")
    p.add_argument("--bias-correction", action="store_true", help="deprecated, no effect: it is the default")
    p.add_argument("--no-equalize", action="store_true",
                   help="skip the per-channel activation equalization of conv -> ReLU -> conv pairs (on by default)")
    p.add_argument("--input-activation", default=None,
                   help="the network input's grid: affine (unsigned codes over its [min, max], the default: each "
                        "value of an 8-bit image keeps its code) | minmax (P1's max-abs; the default with "
                        "--signed-activations) | percentile | mse | kl | improved-kl")
    p.add_argument("--signed-activations", action="store_true",
                   help="signed codes for every activation, the network input included (max-abs), as P1 (default: "
                        "unsigned codes for non-negative, post-ReLU inputs: one more bit of resolution)")
    p.add_argument("--unsigned-activations", action="store_true",
                   help="deprecated, no effect: unsigned codes for non-negative inputs are the default")
    p.add_argument("--quantize-pool", action="store_true",
                   help="also quantize the global-pool input, so the last conv runs as a fused integer kernel in "
                        "ONNX Runtime (with unsigned activations, the default: every conv is a QLinearConv)")
    p.add_argument("--cfws-deploy", default="exact", choices=["exact", "two-branch", "residual"],
                   help="CFWS layers: exact (one int32 sum, ConvInteger in ONNX Runtime: slow), two-branch (fine and "
                        "coarse convs each requantized to int8, then an integer add: fused QLinearConv + QLinearAdd) "
                        "or residual (TensorRT layout: the int8 coarse output is the fine conv's residual input)")
    p.add_argument("--no-one-conv-fallback", action="store_true",
                   help="with --cfws-deploy two-branch/residual: deploy every CFWS layer as two branches (default: a "
                        "layer whose output one per-channel min-max conv reconstructs better on the calibration "
                        "images becomes that one conv)")
    p.add_argument("--reduce-range", action="store_true",
                   help="7-bit weights (codes within +-63) in every integer layer, so ONNX Runtime's fast u8 x s8 "
                        "kernels stay exact on x64 CPUs without VNNI (AVX2, AVX-512 without VNNI) without the slower "
                        "session.x64quantprecision option (docs/results/saturation.md)")
    p.add_argument("--skip-layers", default="",
                   help="comma list of layers of the fused model to keep in float (names or patterns, e.g. "
                        "'linear' or 'stage4.*')")
    p.add_argument("--edge-bits", type=_edge_bits, default=8,
                   help="bits the input layer and the output layers (the classifier; a detector's prediction convs) "
                        "keep at least, below --w-bits / --a-bits of 8, as 4-bit work and repq qat do (0: every "
                        "layer at --w-bits / --a-bits)")
    p.add_argument("--sensitivity", action="store_true",
                   help="detectors: quantize one layer at a time and rank the layers by mAP loss")
    p.add_argument("--keep-sensitive", type=positive_int, default=None,
                   help="detectors: partial quantization, keep the K most sensitive layers in float")
    p.add_argument("--sensitivity-images", type=positive_int, default=200,
                   help="val images for each sensitivity measurement")
    p.add_argument("--compare", action="store_true", help="run the grid of the listed options, print one table")
    p.add_argument("--out", default=None, help="quantized checkpoint to write")
    _device_args(p)
    _common(p)
    p.set_defaults(func=cmd_ptq)

    p = command("eval", "top-1/top-5 of any checkpoint repq wrote")
    p.add_argument("--checkpoint", required=True)
    _data_args(p)
    p.add_argument("--min-top1", type=float, default=None, help="exit with code 1 if top-1 is below this (CI gate; "
                   "with --runtime ort, the ONNX Runtime top-1)")
    p.add_argument("--min-map", type=float, default=None, help="detectors: exit with code 1 if mAP@0.5:0.95 is "
                   "below this")
    p.add_argument("--runtime", default="sim", choices=["sim", "ort"],
                   help="sim: repq's own forward (the integer simulation); ort: also export to ONNX and evaluate "
                        "in ONNX Runtime (integer kernels), with images/s")
    _device_args(p)
    _common(p, writes=False)
    p.set_defaults(func=cmd_eval)

    p = command("export", "write a QDQ ONNX model; --verify runs it in ONNX Runtime")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--onnx", required=True, help="ONNX file to write")
    p.add_argument("--fp", action="store_true", help="export the fused float model (the FP32 reference)")
    p.add_argument("--verify", action="store_true",
                   help="compare ONNX Runtime with repq's simulation on --data; exit 1 (and write nothing) if they "
                        "disagree")
    p.add_argument("--bench", action="store_true",
                   help="report the ONNX Runtime kernel of every quantized layer and the images/s of the model vs "
                        "its FP32 twin at batch 64 and 1")
    p.add_argument("--bench-seconds", type=positive_float, default=3.0, help="--bench: timing per measurement")
    p.add_argument("--max-map-diff", type=nonnegative_float, default=0.1,
                   help="--verify on a detector: the largest mAP@0.5:0.95 difference allowed between ONNX Runtime "
                        "and the simulation")
    p.add_argument("--min-agreement", type=float, default=99.0,
                   help="--verify: the share of images (%%) on which both must predict the same class")
    _data_args(p, required=False)
    _common(p)
    p.set_defaults(func=cmd_export)

    p = command("analyze", "per-layer outlier and quantization-error report with plots")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="folder for report.md and the PNG plots")
    p.add_argument("--calib", type=positive_int, default=32, help="calibration images for the SQNR of layer outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=bit_width, default=8, help="weight bit-width of the SQNR comparison")
    p.add_argument("--no-clipping", action="store_true", help="skip the clipping sensitivity (needs test data)")
    _data_args(p, required=False, eval_batch=False)
    _device_args(p)
    _common(p)
    p.set_defaults(func=cmd_analyze)

    p = command("import", "turn an original RepVGG or mmpretrain checkpoint into a repq checkpoint")
    p.add_argument("--weights", required=True, help="the .pth file (read without running code)")
    p.add_argument("--model", required=True, help="repq model name, e.g. repvgg_a0 (see `repq models`)")
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--in-chans", type=positive_int, default=3)
    p.add_argument("--small-input", action="store_true")
    p.add_argument("--deploy", action="store_true", help="the file holds fused (rbr_reparam) weights")
    p.add_argument("--layout", default="auto", choices=["auto", "original", "mmpretrain"])
    p.add_argument("--out", required=True)
    _common(p)
    p.set_defaults(func=cmd_import)

    p = command("demo", "train a small RepVGG, fuse it, show naive INT8 failing and repq's recipes recovering")
    p.add_argument("--data", default="auto", choices=["auto", "digits", "fashion-mnist"],
                   help="auto: Fashion-MNIST when installed, else the bundled digits")
    p.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default depends on the data)")
    p.add_argument("--seed", type=nonnegative_int, default=None,
                   help="training seed (default 8); whether naive INT8 collapses depends on which channels die")
    p.add_argument("--out", default="runs/demo", help="folder for the checkpoints, table and plots")
    _common(p)
    p.set_defaults(func=cmd_demo)

    p = command("models", "list the models repq can build, with their arguments")
    _common(p, writes=False)
    p.set_defaults(func=cmd_models)
    return parser


def cmd_models(args: argparse.Namespace) -> None:
    import inspect

    import repq
    from repq.models.registry import _REGISTRY

    rows = []
    for name in repq.list_models():
        params = inspect.signature(_REGISTRY[name]).parameters.values()
        rows.append({"name": name, "arguments": {p.name: p.default for p in params
                                                 if p.default is not inspect.Parameter.empty}})
    human = format_table(["model", "arguments (defaults)"],
                         [[r["name"], ", ".join(f"{k}={v}" for k, v in r["arguments"].items())] for r in rows])
    _emit(args, {"command": "models", "models": rows}, human)


def main(argv: list[str] | None = None) -> int:
    _LOADED.clear()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:   # argparse: --help / --version (0) or a one-line usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        with warnings.catch_warnings():
            if args.json:
                warnings.simplefilter("ignore")
            args.func(args)
    except RepqError as exc:
        message = " ".join(str(exc).split())   # one line, whatever the message holds
        if args.json:
            print(json.dumps({"command": args.command, "error": message}))
        if isinstance(exc, CheckFailed):
            print(f"repq {args.command}: check failed: {message}", file=sys.stderr)
            return 1
        print(f"repq {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    skipped = sorted(set().union(*(d.skipped for d in _LOADED)))
    if skipped:   # --skip-corrupt: say what was left out
        print(f"note: --skip-corrupt left out {len(skipped)} unreadable image(s), e.g. {skipped[0]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

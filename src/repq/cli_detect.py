"""The detection side of the `repq` commands: train, eval, ptq, qat and export on a YOLOv6-style detector, with
COCO mAP as the metric. `repq.cli` routes here when --task detect is given or inferred (a detection --data source
or a detector checkpoint)."""
from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

from repq.cli_checks import check_data_matches, data_meta
from repq.errors import RepqError
from repq.tables import format_table

DETECT_HINT = "fashion-mnist-det, digits-det, coco:DIR or yolo:DIR"


def task_of(args: argparse.Namespace, model_config: dict | None = None, model_name: str | None = None) -> str:
    """'detect' or 'classify', from --task, the --data source, the checkpoint's model or --model; a contradiction
    is a one-line error."""
    from repq.data.detection import is_detection_spec
    from repq.models.yolo import is_detector

    votes = {}
    data = getattr(args, "data", None)
    if data and data != "auto":
        votes["--data " + data] = "detect" if is_detection_spec(data) else "classify"
    if model_config is not None:
        votes["the checkpoint's model " + str(model_config.get("name"))] = \
            "detect" if is_detector(model_config) else "classify"
    if model_name is not None:
        votes["--model " + model_name] = "detect" if is_detector({"name": model_name}) else "classify"
    given = getattr(args, "task", "auto") or "auto"
    if given != "auto":
        votes["--task " + given] = given
    kinds = set(votes.values())
    if len(kinds) > 1:
        detect = [k for k, v in votes.items() if v == "detect"]
        classify = [k for k, v in votes.items() if v == "classify"]
        raise RepqError(f"{' and '.join(detect)} {'mean' if len(detect) > 1 else 'means'} detection but "
                        f"{' and '.join(classify)} {'mean' if len(classify) > 1 else 'means'} classification; "
                        f"detectors take detection data ({DETECT_HINT}), classifiers classification data")
    return kinds.pop() if kinds else "classify"


def load_detection_data(args: argparse.Namespace, split: str, payload: dict[str, Any] | None = None,
                        spec: str | None = None):
    """The detection set of --data (or `spec`) at --image-size, else the size the checkpoint recorded."""
    from repq.data.detection import load_detection

    spec = spec or args.data
    flags = [f"--{f.replace('_', '-')}" for f in ("crop_pct", "interpolation", "mean", "std", "skip_corrupt")
             if getattr(args, f, None) not in (None, False)]
    if flags:
        raise RepqError(f"{', '.join(flags)} apply to imagefolder and filelist data only; drop them for detection "
                        f"data (--image-size sets the letterbox size)")
    recorded = (payload or {}).get("data_meta") or {}
    size = getattr(args, "image_size", None) or (recorded.get("input_size") or [None])[-1]
    data = load_detection(spec, split, size)
    if getattr(args, "batch_size", 0) is None:
        args.batch_size = 32
    if split == "test" and getattr(args, "eval_limit", None):
        data = data.subset(args.eval_limit)
    return data


def check_detection_data(payload: dict[str, Any], data, allow_mismatch: bool) -> None:
    config = payload["model"]
    classes, chans = config.get("num_classes", 80), config.get("in_chans", 3)
    if data.num_classes != classes or data.in_chans != chans:
        raise RepqError(f"the detector takes {chans}-channel images and {classes} classes but {data.name} has "
                        f"{data.in_chans} channels and {data.num_classes} classes; use the data it was trained on")
    check_data_matches(payload, data, allow_mismatch)


def _metrics_row(name: str, m: dict[str, Any]) -> list[Any]:
    return [name, m["map"], m["map50"], m["n"], f"{m['images_per_s']:.1f}"]


_METRIC_HEADERS = ["model", "mAP@0.5:0.95", "mAP@0.5", "images", "model images/s"]


# ---------------------------------------------------------------- train
def train(args: argparse.Namespace, extra: dict[str, Any], device) -> dict[str, Any]:
    import torch

    import repq
    from repq.detect.training import DetectTrainConfig, evaluate_detection, train_detector

    refused = [flag for flag, on in (("--small-input", args.small_input), ("--width-scale", args.width_scale != 1.0),
                                      ("--label-smoothing", args.label_smoothing > 0)) if on]
    if refused:
        raise RepqError(f"{', '.join(refused)} apply to classifiers; for a smaller detector use --model yolov6_pico")
    train_ds = load_detection_data(args, "train")
    test_ds = load_detection_data(args, "test")
    torch.manual_seed(args.seed)
    try:
        model = repq.create_model(args.model, num_classes=train_ds.num_classes, in_chans=train_ds.in_chans,
                                  **extra).to(device)
    except (ValueError, TypeError) as exc:
        raise RepqError(f"--model {args.model} cannot be built with these options: {exc}") from None
    config = DetectTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                               augment=not args.no_augment, seed=args.seed, max_steps_per_epoch=args.max_steps,
                               amp=args.amp)
    history = train_detector(model, train_ds, config, eval_data=test_ds, out=args.out, resume=args.resume,
                             progress=not args.json,
                             checkpoint_extra={"data": args.data, "data_meta": data_meta(train_ds)})
    from repq.training import distributed_context
    if distributed_context(device)[0] != 0:
        return {}
    fused = evaluate_detection(repq.reparameterize(model, test_ds.head(2)[0].to(device)), test_ds)
    rows = [[e["epoch"], f"{e['loss']:.3f}", e.get("map", float("nan")), e.get("map50", float("nan")),
             f"{e['images_per_s']:.0f}"] for e in history["epochs"]]
    human = format_table(["epoch", "train loss", "val mAP@0.5:0.95", "val mAP@0.5", "images/s"], rows)
    human += (f"\n\nfused detector: mAP@0.5:0.95 {fused['map']:.2f}, mAP@0.5 {fused['map50']:.2f} on "
              f"{fused['n']} val images   checkpoint: {args.out}")
    human += f"\nnext: repq ptq --checkpoint {args.out} --data {args.data} --out <int8.pt>"
    return {"result": {"command": "train", "task": "detect", "checkpoint": args.out, "epochs": history["epochs"],
                       "fused": fused, "seconds": history["seconds"]}, "human": human}


# ---------------------------------------------------------------- eval
def evaluate(args: argparse.Namespace, model, payload: dict[str, Any], device) -> dict[str, Any]:
    import repq
    from repq.detect.training import evaluate_detection

    test_ds = load_detection_data(args, "test", payload)
    check_detection_data(payload, test_ds, args.allow_data_mismatch)
    progress = not args.json
    rows = {payload["kind"]: evaluate_detection(model, test_ds, args.batch_size, progress)}
    deploy = model
    if payload["kind"] == "train":
        deploy = repq.reparameterize(model, test_ds.head(2)[0].to(device))
        rows["fused"] = evaluate_detection(deploy, test_ds, args.batch_size, progress)
    if args.runtime == "ort":
        rows[f"{'fused' if payload['kind'] == 'train' else payload['kind']} in ONNX Runtime"] = ort_metrics(
            deploy.cpu(), test_ds, allow_float=not payload.get("quant"), batch_size=args.batch_size,
            progress=progress)
    human = format_table(_METRIC_HEADERS, [_metrics_row(k, v) for k, v in rows.items()])
    human += f"\nCOCO mAP (pycocotools) on the {rows[payload['kind']]['n']} val images; batch {args.batch_size}"
    gate = rows[next(k for k in rows if "ONNX" in k)] if args.runtime == "ort" else rows[payload["kind"]]
    return {"result": {"command": "eval", "task": "detect", "checkpoint": args.checkpoint, "results": rows},
            "human": human, "gate": gate["map"]}


def ort_metrics(model, data, allow_float: bool, batch_size: int, progress: bool) -> dict[str, Any]:
    """mAP of the model exported to ONNX and run by ONNX Runtime."""
    import tempfile
    from pathlib import Path

    from repq.detect.training import evaluate_detection
    from repq.export import OnnxRuntimeModel, export_onnx
    with tempfile.TemporaryDirectory(prefix="repq-eval-") as tmp:
        path = export_onnx(model, Path(tmp) / "model.onnx", data.head(1)[0], allow_float=allow_float)
        return evaluate_detection(OnnxRuntimeModel(path), data, batch_size, progress)


# ---------------------------------------------------------------- ptq
def ptq(args: argparse.Namespace, model, payload: dict[str, Any], grid: list[dict], configs: list,
        device) -> dict[str, Any]:
    import repq
    from repq.detect.training import evaluate_detection

    train_ds = load_detection_data(args, "train", payload)
    test_ds = load_detection_data(args, "test", payload)
    check_detection_data(payload, train_ds, args.allow_data_mismatch)
    if args.keep_sensitive and len(grid) > 1:
        raise RepqError("--keep-sensitive picks layers for one recipe; drop --compare or give one method per option")
    progress = not args.json
    fp = evaluate_detection(model, test_ds, args.batch_size, progress)
    results, last = [], None
    for options, config in zip(grid, configs):
        calib = train_ds.calibration_images(config.num_samples, config.seed)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="calibration data has")
            qmodel = repq.quantize(model, calib, config)
        seconds = time.perf_counter() - start
        m = evaluate_detection(qmodel, test_ds, args.batch_size, progress)
        results.append({**options, "map": m["map"], "map50": m["map50"], "drop": fp["map"] - m["map"],
                        "ptq_seconds": seconds, "float_layers": qmodel.repq_quant["float_layers"],
                        "fusion": qmodel.repq_quant["fusion"],
                        "bias_grid_widened": qmodel.repq_quant.get("bias_grid_widened", {})})
        last = qmodel
    human = (f"FP mAP@0.5:0.95 {fp['map']:.2f}, mAP@0.5 {fp['map50']:.2f} ({fp['n']} val images, "
             f"{configs[0].num_samples} calibration images, seed {configs[0].seed})\n")
    human += format_table(["weight", "granularity", "activation", "bits", "mAP@0.5:0.95", "mAP@0.5", "drop", "PTQ s"],
                          [[r["weight"], r["weight_granularity"], r["activation"], f"W{r['w_bits']}A{r['a_bits']}",
                            r["map"], r["map50"], r["drop"], f"{r['ptq_seconds']:.1f}"] for r in results])
    sensitivity = None
    if args.sensitivity or args.keep_sensitive:
        from repq.analysis.sensitivity import layer_sensitivity
        subset = test_ds.subset(args.sensitivity_images)
        baseline, ranking = layer_sensitivity(
            last, lambda net: evaluate_detection(net, subset, args.batch_size)["map"], progress=progress)
        sensitivity = {"images": len(subset), "float_map": baseline, "layers": ranking}
        human += (f"\n\nsensitivity (one layer quantized at a time, mAP@0.5:0.95 on {len(subset)} val images, float "
                  f"{baseline:.2f}); most sensitive first:\n")
        human += format_table(["layer", "mAP", "loss"], [[r["layer"], r["metric"], r["loss"]] for r in ranking[:10]])
    if args.keep_sensitive:
        from dataclasses import replace
        keep = [r["layer"] for r in sensitivity["layers"][:args.keep_sensitive]]
        config = replace(configs[0], skip_layers=tuple(configs[0].skip_layers) + tuple(keep))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="calibration data has")
            last = repq.quantize(model, train_ds.calibration_images(config.num_samples, config.seed), config)
        m = evaluate_detection(last, test_ds, args.batch_size, progress)
        results.append({**grid[0], "map": m["map"], "map50": m["map50"], "drop": fp["map"] - m["map"],
                        "ptq_seconds": time.perf_counter() - start, "float_layers": last.repq_quant["float_layers"],
                        "fusion": last.repq_quant["fusion"], "partial": args.keep_sensitive,
                        "bias_grid_widened": last.repq_quant.get("bias_grid_widened", {})})
        human += (f"\n\npartial quantization: the {args.keep_sensitive} most sensitive layer(s) kept in float: "
                  f"mAP@0.5:0.95 {m['map']:.2f} (drop {fp['map'] - m['map']:.2f}), mAP@0.5 {m['map50']:.2f}")
    final = results[-1]
    human += "\nkept in float: " + (", ".join(final["float_layers"]) or "nothing")
    if final["bias_grid_widened"]:
        human += ("\nweight scales widened so the int32 bias fits (near-zero filters): " +
                  ", ".join(f"{k} ({v} ch)" for k, v in final["bias_grid_widened"].items()))
    if args.out:
        repq.save_checkpoint(args.out, last, source=str(args.checkpoint), data=args.data,
                             data_meta=data_meta(train_ds), metrics={"fp": fp, "quantized": final})
        human += (f"\nquantized checkpoint: {args.out}\nnext: repq export --checkpoint {args.out} --onnx "
                  f"<model.onnx> --data {args.data} --verify")
    return {"result": {"command": "ptq", "task": "detect", "fp": fp, "results": results,
                       "sensitivity": sensitivity, "checkpoint": args.out}, "human": human}


# ---------------------------------------------------------------- qat
def qat(args: argparse.Namespace, model, payload: dict[str, Any], config, device) -> dict[str, Any]:
    import repq
    from repq.detect.training import DetectTrainConfig, evaluate_detection, train_detector
    from repq.training import distributed_context

    train_ds = load_detection_data(args, "train", payload)
    test_ds = load_detection_data(args, "test", payload)
    check_detection_data(payload, train_ds, args.allow_data_mismatch)
    rank = distributed_context(device)[0]
    qat_model = repq.prepare_qat(model, config, train_ds.calibration_images(config.num_samples, config.seed).to(device))
    qat_model.num_classes, qat_model.strides = model.num_classes, model.strides
    rows = []
    if rank == 0:
        fused = repq.reparameterize(model, test_ds.head(2)[0].to(device))
        rows.append(["FP (fused)", evaluate_detection(fused, test_ds)])
        rows.append(["PTQ start (QAT initialization)", evaluate_detection(qat_model, test_ds)])
    train_config = DetectTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                     weight_decay=args.weight_decay, augment=not args.no_augment, seed=args.seed,
                                     max_steps_per_epoch=args.max_steps, amp=args.amp, warmup_epochs=0.0,
                                     ema_decay=0.0, distill=args.distill)
    history = train_detector(qat_model, train_ds, train_config, eval_data=test_ds, progress=not args.json,
                             teacher=model if args.distill else None)
    qmodel = repq.convert_qat(qat_model)
    if rank != 0:
        return {}
    rows.append([f"QAT {args.method} W{args.w_bits}A{args.a_bits}"
                 + (", weights <= 7 bits" if config.reduce_range else ""), evaluate_detection(qmodel, test_ds)])
    metrics = {"fp": rows[0][1], "start": rows[1][1], "qat": rows[2][1]}
    repq.save_checkpoint(args.out, qmodel, source=str(args.checkpoint), data=args.data, metrics=metrics,
                         history=history, data_meta=data_meta(train_ds))
    human = format_table(_METRIC_HEADERS, [_metrics_row(name, m) for name, m in rows])
    human += (f"\n\n{len(history['epochs'])} epochs, {history['seconds'] / 60:.1f} min; quantized checkpoint: "
              f"{args.out}\nnext: repq export --checkpoint {args.out} --onnx <model.onnx> --data {args.data} --verify")
    return {"result": {"command": "qat", "task": "detect", "checkpoint": args.out, **metrics,
                       "epochs": history["epochs"], "seconds": history["seconds"]}, "human": human}


# ---------------------------------------------------------------- export --verify
def verify(model, path, data, batch_size: int, progress: bool, compared_images: int = 256) -> dict[str, Any]:
    """mAP of repq's simulation and of ONNX Runtime on the same images, and how far their raw outputs differ on
    the first `compared_images` (each runtime runs once over the data)."""
    from repq.detect.training import evaluate_detection
    from repq.export import OnnxRuntimeModel

    compared_batches = -(-compared_images // batch_size)
    sim_outputs: dict[int, list] = {}
    diffs, scales = [], []

    def keep(index: int, outputs: list) -> None:
        if index < compared_batches:
            sim_outputs[index] = outputs
            scales.append(max(float(o.abs().max()) for o in outputs))

    def compare(index: int, outputs: list) -> None:
        if index in sim_outputs:
            diffs.append(max(float((a - b).abs().max()) for a, b in zip(outputs, sim_outputs.pop(index))))

    sim_metrics = evaluate_detection(model, data, batch_size, progress, on_outputs=keep)
    ort_metrics_ = evaluate_detection(OnnxRuntimeModel(path), data, batch_size, progress, on_outputs=compare)
    return {"n": sim_metrics["n"], "map_repq": sim_metrics["map"], "map_onnxruntime": ort_metrics_["map"],
            "map50_repq": sim_metrics["map50"], "map50_onnxruntime": ort_metrics_["map50"],
            "max_output_diff": max(diffs), "output_scale": max(scales),
            "compared_images": min(sim_metrics["n"], compared_batches * batch_size)}


def verify_failure(v: dict[str, Any], max_map_diff: float) -> str | None:
    numbers = [v["max_output_diff"], v["map_repq"], v["map_onnxruntime"]]
    if not all(x == x and abs(x) != float("inf") for x in numbers):
        return "the outputs are NaN or infinite (a corrupt scale in the checkpoint?)"
    if abs(v["map_repq"] - v["map_onnxruntime"]) > max_map_diff:
        return (f"mAP@0.5:0.95 {v['map_onnxruntime']:.2f} in ONNX Runtime vs {v['map_repq']:.2f} in repq's "
                f"simulation (allowed difference {max_map_diff:g})")
    return None

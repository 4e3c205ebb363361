"""repq vs the PTQ a user would try first, on the same model, data and calibration images (32, 3 seeds):
PyTorch FX-mode PTQ (x86 backend; PT2E is no longer in torch.ao of torch 2.13), ONNX Runtime `quantize_static`
(MinMax, Entropy, Percentile; QDQ, per-channel int8 weights, uint8 activations) and NNCF (if installed:
`pip install 'repq[peers]'`).

    python benchmarks/peer_benchmark.py           # reference Fashion-MNIST RepVGG-A0 (~5 min on 2 cores)
    python benchmarks/peer_benchmark.py --quick   # tiny digits model, one seed (seconds)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import warnings
from pathlib import Path

import torch

from common import QUICK_REFERENCE, REFERENCE, machine, reference_checkpoint, repq, write_result
from export_benchmark import ort_quantize_static
from repq.export import export_onnx, run_onnx, top1

REPQ_RECIPES = {
    "repq default (CFWS + auto)": {},
    "repq CFWS + improved KL (P1)": dict(weight="cfws", activation="improved_kl"),
    "repq min-max per-channel + min-max": dict(weight="minmax", activation="minmax"),
}


def torch_fx_ptq(fused: torch.nn.Module, calib: torch.Tensor) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(fused), get_default_qconfig_mapping("x86"), example_inputs=(calib[:1],))
        with torch.no_grad():
            prepared(calib)
        return convert_fx(prepared)


def nncf_ptq(fused: torch.nn.Module, calib: torch.Tensor) -> torch.nn.Module | None:
    try:
        import nncf
    except ImportError:
        return None
    return nncf.quantize(copy.deepcopy(fused), nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]),
                         subset_size=len(calib))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    spec = QUICK_REFERENCE if args.quick else REFERENCE
    seeds = [0] if args.quick else [0, 1, 2]
    model, _ = repq.load_checkpoint(reference_checkpoint(quick=args.quick))
    train_ds, test_ds = repq.load_dataset(spec["data"], "train"), repq.load_dataset(spec["data"], "test")
    images, labels = test_ds.normalize(test_ds.images), test_ds.labels.numpy()
    fused = repq.reparameterize(model)
    fp = repq.evaluate(fused, test_ds)["top1"]
    tmp = Path(tempfile.mkdtemp(prefix="repq-peers-"))
    fp_onnx = export_onnx(fused, tmp / "fp32.onnx", images[:1], allow_float=True)
    ort_methods = ("MinMax",) if args.quick else ("MinMax", "Entropy", "Percentile")
    scores: dict[str, list[float]] = {}
    for seed in seeds:
        calib = train_ds.calibration_images(32, seed)
        for name, options in REPQ_RECIPES.items():
            q = repq.quantize(model, calib, repq.PTQConfig(seed=seed, **options))
            scores.setdefault(name, []).append(repq.evaluate(q, test_ds)["top1"])
        scores.setdefault("PyTorch FX PTQ (x86, default qconfig)", []).append(
            repq.evaluate(torch_fx_ptq(fused, calib), test_ds)["top1"])
        for method in ort_methods:
            path = ort_quantize_static(fp_onnx, tmp / f"ort_{method}_{seed}.onnx", calib.numpy(), method)
            scores.setdefault(f"ONNX Runtime quantize_static {method}", []).append(
                top1(run_onnx(path, images.numpy()), labels))
        nncf_model = None if args.quick else nncf_ptq(fused, calib)
        if nncf_model is not None:
            scores.setdefault("NNCF PTQ (defaults, fast bias correction)", []).append(
                repq.evaluate(nncf_model, test_ds)["top1"])
        print(f"seed {seed}: " + ", ".join(f"{k}: {v[-1]:.2f}" for k, v in scores.items()), flush=True)
    cmd = "python benchmarks/peer_benchmark.py" + (" --quick" if args.quick else "")
    lines = [f"# repq vs peer PTQ tools: {spec['model']} {spec['model_kwargs']} ({spec['data']}), W8A8", "",
             f"Command: `{cmd}` (the same 32 calibration images per seed for every tool, seeds {seeds}; "
             "full test split)", f"Machine: {machine()}", "",
             "One model (the export/QAT reference). The same peers on the 10 models of the zoo, 3 seeds each, are in "
             "docs/results/ptq.md (`python benchmarks/ptq_benchmark.py --peers`); one model's differences of a "
             "tenth of a point are within the seeds' spread.", "",
             f"Float (fused) top-1: **{fp:.2f}**", "",
             "| method | top-1 mean | ± std | drop vs FP |", "|---|---|---|---|"]
    for name, values in scores.items():
        spread = statistics.pstdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(values):.2f} | {spread:.2f} | {fp - statistics.mean(values):+.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("peers", text, {"fp_top1": fp, "scores": scores, "seeds": seeds, "machine": machine()})


if __name__ == "__main__":
    main()

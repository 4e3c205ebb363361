"""INT8 on x64 CPUs without VNNI: ONNX Runtime's default u8 x s8 kernels add each pair of products in int16 and
saturate when the weight codes are large (CFWS fills them to +-127). Two exact remedies, measured side by side:
ONNX Runtime's session option session.x64quantprecision=1 (its weights become uint8, slower u8 x u8 kernels) and
repq's PTQConfig(reduce_range=True) (7-bit weights, codes within +-63: no pair leaves int16, default kernels).

    python benchmarks/saturation_benchmark.py --only M1,M2   # both parts on the zoo entries named, writes
                                                              # docs/results/saturation.*
    python benchmarks/saturation_benchmark.py --parts speed   # re-measure one part (~7 min), keep the other
    python benchmarks/saturation_benchmark.py --quick         # tiny models, prints only

speed: full-width RepVGG-A0 at 224x224 (1000 classes, untrained and seeded, 32 seeded random calibration images:
  speed does not depend on the weights), FP32 and INT8 (repq's default recipe with two-branch CFWS, and per-channel
  min-max + percentile; 8-bit and 7-bit weights), images/s at batch 64 and 1 in ONNX Runtime's default session and
  with the option, and how far the default kernels' logits are from the exact ones on 8 random images.
accuracy: zoo models; top-1 in repq's simulation of the same recipes at 8-bit and 7-bit weights over calibration
  seeds (32 train images each), and top-1 in ONNX Runtime of the seed-0 models under both kernels: what a user who
  runs an 8-bit model without the option gets on such a CPU.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import PLAIN, RESULTS, cpu_line, machine, repq, write_result
from repq.export import export_onnx
from repq.export.bench import throughput
from repq.export.verify import OnnxRuntimeModel, largest_weight_code
from zoo import select, zoo, zoo_checkpoint

RECIPES = {"CFWS two-branch": {"cfws_deploy": "two_branch"},
           "min-max/channel + percentile": {**PLAIN, "weight": "minmax", "activation": "percentile"}}
WIDTHS = {"8-bit": False, "7-bit (reduce_range)": True}
KERNELS = (("default", False), ("exact option", True))   # ONNX Runtime session: exact_u8s8


def quantized_models(model, calib, seed: int = 0) -> dict[tuple[str, str], torch.nn.Module]:
    return {(label, width): repq.quantize(model, calib, repq.PTQConfig(quantize_pool=True, reduce_range=narrow,
                                                                       seed=seed, **options))
            for label, options in RECIPES.items() for width, narrow in WIDTHS.items()}


def speed_part(quick: bool, seconds: float, repeats: int, tmp: Path) -> dict:
    size = 32 if quick else 224
    torch.manual_seed(0)
    model = repq.create_model("repvgg_a0", num_classes=1000).eval()
    calib = torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(0))
    probe = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    paths = {("FP32", ""): export_onnx(repq.reparameterize(model, calib[:2]), tmp / "fp32.onnx", calib[:1],
                                       allow_float=True)}
    for (label, width), q in quantized_models(model, calib).items():
        paths[(label, width)] = export_onnx(q, tmp / f"{label[:6]}_{width[0]}.onnx".replace(" ", "_"), calib[:1])
    speeds: dict = {key: {kind: {"64": [], "1": []} for kind, _ in KERNELS} for key in paths}   # json keys
    for _ in range(repeats):   # interleaved repeats: a slow spell of the machine hits every model alike
        for key, path in paths.items():
            for kind, exact in KERNELS:
                for b in (64, 1):
                    speeds[key][kind][str(b)].append(throughput(path, [3, size, size], b, seconds, threads=2,
                                                           exact_u8s8=exact))
    rows = []
    for (label, width), path in paths.items():
        row = {"model": label, "weights": width, "largest_code": largest_weight_code(path),
               "images_per_s": {kind: {b: float(np.median(v)) for b, v in by_batch.items()}
                                for kind, by_batch in speeds[(label, width)].items()},
               "runs": speeds[(label, width)]}
        fast = OnnxRuntimeModel(path, exact_u8s8=False)(probe).numpy()
        exact = OnnxRuntimeModel(path, exact_u8s8=True)(probe).numpy()
        row["drift"] = float(np.abs(fast - exact).max() / max(np.abs(exact).max(), 1e-12))
        print(row, flush=True)
        rows.append(row)
    cmd = "python benchmarks/saturation_benchmark.py --parts speed" + (" --quick" if quick else "")
    return {"command": cmd, "machine": machine(), "cpu": cpu_line(), "size": size, "seconds": seconds,
            "repeats": repeats, "rows": rows}


def accuracy_part(names: list[str], quick: bool, seeds: list[int], tmp: Path, only: str) -> dict:
    rows = []
    for name in names:
        model, _ = repq.load_checkpoint(zoo_checkpoint(name, quick=quick, progress=False))
        data = zoo(quick)[name]["data"]
        train_ds, test_ds = repq.load_dataset(data, "train"), repq.load_dataset(data, "test")
        row = {"model": name, "fp": repq.evaluate(model, test_ds)["top1"], "sim": {}, "ort": {}}
        probe = test_ds.normalize(test_ds.images[:2000])
        for seed in seeds:
            calib = train_ds.calibration_images(32, seed=seed)
            for (label, width), q in quantized_models(model, calib, seed).items():
                key = f"{label} | {width}"
                row["sim"].setdefault(key, {})[str(seed)] = repq.evaluate(q, test_ds)["top1"]
                if seed != seeds[0]:
                    continue
                path = export_onnx(q, tmp / f"{name}.onnx", calib[:1])
                row["ort"][key] = {"largest_code": largest_weight_code(path)}
                predictions = {}
                for kind, exact in KERNELS:
                    runtime = OnnxRuntimeModel(path, exact_u8s8=exact)
                    row["ort"][key][kind] = repq.evaluate(runtime, test_ds)["top1"]
                    predictions[kind] = runtime(probe).argmax(1)
                row["ort"][key]["same_prediction"] = float(
                    (predictions["default"] == predictions["exact option"]).float().mean() * 100)
        print(row, flush=True)
        rows.append(row)
    cmd = ("python benchmarks/saturation_benchmark.py --parts accuracy" + (" --quick" if quick else "")
           + (f" --only {only}" if only else "") + f" --seeds {','.join(map(str, seeds))}")
    return {"command": cmd, "machine": machine(), "cpu": cpu_line(), "seeds": seeds, "rows": rows}


def _mean(values: dict[str, float]) -> float:
    return float(np.mean(list(values.values())))


def _signed(x: float, digits: int = 2) -> str:
    """+0.00 for a difference that is zero up to float noise (never -0.00)."""
    return f"{round(float(x), digits + 4) + 0.0:+.{digits}f}"


def render(result: dict) -> str:
    lines = ["# INT8 on x64 CPUs without VNNI: saturation, the session option and 7-bit weights", "",
             "ONNX Runtime's default u8 x s8 kernels on x64 CPUs without VNNI add each pair of products in int16 and "
             "saturate beyond 32767, where a pair of weight codes whose magnitudes add up to more than 128 can take "
             "it (255 x 127 x 2 = 64770). "
             "Exact remedies: the session option `session.x64quantprecision=1` (ONNX Runtime turns the int8 "
             "weights into uint8 and runs u8 x u8 kernels) and `repq ptq --reduce-range` / "
             "`PTQConfig(reduce_range=True)` (7-bit weights in every integer layer, codes within +-63: no pair "
             "leaves int16, the default kernels are exact). With the option, ONNX Runtime converts only the weight "
             "tensors with codes beyond +-64, so 7-bit layers keep the fast kernels either way. repq's own ONNX "
             "Runtime sessions (verification, `repq eval --runtime ort`, `repq export --bench`) set the option.", ""]
    speed = result.get("speed")
    if speed:
        lines += [f"## Speed: RepVGG-A0, full width, {speed['size']}x{speed['size']}, ONNX Runtime CPU, 2 threads",
                  "", f"Command: `{speed['command']}`", f"Machine: {speed['machine']}; {speed['cpu']}; random "
                  f"inputs; each figure the median of {speed.get('repeats', 1)} interleaved {speed['seconds']:g}-s "
                  "measurements", "",
                  "drift: max |logit difference| between the default and the exact kernels on 8 random images, "
                  "relative to the largest logit (0 = exact).", "",
                  "| model | weights | largest code | images/s b=64, default kernels | images/s b=64, exact option | "
                  "b=1 default | b=1 exact option | b=64 vs FP32 (default / option) | drift |",
                  "|---|---|---|---|---|---|---|---|---|"]
        fp = speed["rows"][0]["images_per_s"]["default"]["64"]
        for r in speed["rows"]:
            s = r["images_per_s"]
            d64, e64 = s["default"]["64"], s["exact option"]["64"]
            lines.append(f"| {r['model']} | {r['weights'] or 'float'} | {r['largest_code']} | {d64:.1f} | "
                         f"{e64:.1f} | {s['default']['1']:.1f} | {s['exact option']['1']:.1f} | {d64 / fp:.2f}x / "
                         f"{e64 / fp:.2f}x | {r['drift']:.3g} |")
        lines.append("")
    acc = result.get("accuracy")
    if acc:
        seeds = ", ".join(map(str, acc["seeds"]))
        lines += ["## Accuracy on zoo models", "", f"Command: `{acc['command']}`",
                  f"Machine: {acc['machine']}; {acc['cpu']}", "",
                  f"Simulation: repq's top-1, mean over calibration seeds {seeds} (32 train images each), full test "
                  "split; quantize_pool. ONNX Runtime: the seed-0 model, in brackets its difference from the "
                  "simulation's seed-0 top-1; same prediction = default vs exact kernels on the first 2000 test "
                  "images.", "",
                  "| model | FP | recipe | sim 8-bit | sim 7-bit | 7-bit - 8-bit (mean / worst seed) | ORT 8-bit, "
                  "default kernels | ORT 8-bit, exact option | same prediction 8-bit | ORT 7-bit, default kernels | "
                  "same prediction 7-bit |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        gaps: dict[str, list[float]] = {}
        for r in acc["rows"]:
            for label in RECIPES:
                wide, narrow = r["sim"][f"{label} | 8-bit"], r["sim"][f"{label} | 7-bit (reduce_range)"]
                diffs = [narrow[s] - wide[s] for s in wide]
                gaps.setdefault(label, []).extend(diffs)
                ow, on = r["ort"][f"{label} | 8-bit"], r["ort"][f"{label} | 7-bit (reduce_range)"]
                first = str(acc["seeds"][0])
                lines.append(f"| {r['model']} | {r['fp']:.2f} | {label} | {_mean(wide):.2f} | {_mean(narrow):.2f} | "
                             f"{_signed(np.mean(diffs))} / {_signed(min(diffs))} | {ow['default']:.2f} | "
                             f"{ow['exact option']:.2f} ({_signed(ow['exact option'] - wide[first])}) | "
                             f"{ow['same_prediction']:.2f}% | {on['default']:.2f} "
                             f"({_signed(on['default'] - narrow[first])}) | {on['same_prediction']:.2f}% |")
        lines.append("")
        for label, diffs in gaps.items():
            lines.append(f"{label}: 7-bit - 8-bit weights over {len(acc['rows'])} models x {len(acc['seeds'])} "
                         f"seeds: mean {_signed(np.mean(diffs), 3)}, worst {_signed(min(diffs))} pt")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma list of zoo entries for the accuracy part (default: all)")
    parser.add_argument("--parts", default="speed,accuracy", help="speed, accuracy or both (the other is kept)")
    parser.add_argument("--seeds", default="0,1,2", help="calibration seeds of the accuracy part")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per throughput measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved measurements per figure (median)")
    parser.add_argument("--render-only", action="store_true", help="rewrite saturation.md from saturation.json")
    args = parser.parse_args()
    parts = {p for p in args.parts.split(",") if p}
    if not parts or parts - {"speed", "accuracy"}:
        parser.error("--parts: give speed, accuracy or speed,accuracy")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",") if s]
    saved = RESULTS / "saturation.json"
    result = json.loads(saved.read_text()) if saved.exists() and not args.quick else {}
    tmp = Path(tempfile.mkdtemp(prefix="repq-saturation-"))
    if args.render_only:
        parts = set()
    if "speed" in parts:
        result["speed"] = speed_part(args.quick, 0.3 if args.quick else args.seconds, 1 if args.quick else args.repeats,
                                     tmp)
    if "accuracy" in parts:
        names = select(args.only, args.quick, default=["quick_a0"] if args.quick else None)
        result["accuracy"] = accuracy_part(names, args.quick, seeds, tmp, args.only)
    text = render(result)
    print(text)
    if not args.quick:
        write_result("saturation", text, result)


if __name__ == "__main__":
    main()

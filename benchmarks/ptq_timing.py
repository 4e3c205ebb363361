"""PTQ wall time and memory: repq's default (equalization + CFWS + auto, guarded) vs P1's improved KL alone, on a
full RepVGG-A0 at 28x28 (Fashion-MNIST calibration images) and at 224x224 (3 channels, 1000 classes, random
images), both with random weights and non-trivial BN statistics (the work done does not depend on the values), 32
calibration images, plus 256 images at 224x224.

    python benchmarks/ptq_timing.py            # a few minutes on 2 cores
    python benchmarks/ptq_timing.py --quick    # tiny sizes (seconds)
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from common import PLAIN, machine, repq, write_result
from zoo import zoo_checkpoint

DEFAULT, KL = "repq default", "CFWS + improved KL"
RECIPES = {DEFAULT: {}, KL: {**PLAIN, "activation": "improved_kl"}}


def randomized_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model.eval()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def time_quantize(model, images, options, repeats: int = 1) -> float:
    """Median wall time of `repeats` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        repq.quantize(model, images, repq.PTQConfig(num_samples=len(images), **options))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--note", default="", help="a line about the machine's load, printed with the table")
    args = parser.parse_args()
    torch.manual_seed(0)
    cases = []
    if args.quick:
        small, _ = repq.load_checkpoint(zoo_checkpoint("quick_a0", quick=True))
        cases.append(("quick_a0 (digits 8x8)", small, repq.load_dataset("digits", "train").calibration_images(32)))
        big = randomized_bn(repq.create_model("repvgg_a0", num_classes=10, in_chans=3, width_scale=0.125))
        cases.append(("RepVGG-A0 x0.125, 64x64, random", big, torch.randn(32, 3, 64, 64)))
    else:
        small = randomized_bn(repq.create_model("repvgg_a0", num_classes=10, in_chans=1))
        cases.append(("RepVGG-A0, 28x28 Fashion-MNIST images, random weights", small,
                      repq.load_dataset("fashion-mnist", "train").calibration_images(32)))
        big = randomized_bn(repq.create_model("repvgg_a0", num_classes=1000, in_chans=3))
        cases.append(("RepVGG-A0, 224x224, random", big, torch.randn(32, 3, 224, 224)))
    rows = []
    for name, options in RECIPES.items():   # warm-up: the first call of a process pays one-time costs (lazy imports,
        time_quantize(cases[0][1], cases[0][2][:4], options)   # kernel set-up), not PTQ work
    for label, model, images in cases:
        times = {name: time_quantize(model, images, options, repeats=3) for name, options in RECIPES.items()}
        ratio = times[DEFAULT] / times[KL]
        rows.append({"case": label, "images": len(images), **times, "ratio": ratio})
        print(rows[-1], flush=True)
    label, model, _ = cases[-1]
    many = torch.randn(256, *cases[-1][2].shape[1:])
    seconds = time_quantize(model, many, {})
    rows.append({"case": label, "images": 256, DEFAULT: seconds, KL: None, "ratio": None})
    cmd = "python benchmarks/ptq_timing.py" + (" --quick" if args.quick else "")
    lines = ["# PTQ wall time", "", f"Command: `{cmd}`", f"Machine: {machine()}", *([args.note] if args.note else []),
             "", "Median of 3 runs after one warm-up call per recipe (32 images; the 256-image run once). P1's "
             "improved KL alone: no equalization, bias correction or guard. Both include the verified fusion.", "",
             "| model | calibration images | repq default s | CFWS + P1's improved KL s | ratio |",
             "|---|---|---|---|---|"]
    for r in rows:
        kl = "-" if r[KL] is None else f"{r[KL]:.2f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['case']} | {r['images']} | {r[DEFAULT]:.2f} | {kl} | {ratio} |")
    lines += ["", f"Peak resident memory of the process: {peak_rss_gib():.2f} GiB."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("ptq_timing", text, {"rows": rows, "peak_rss_gib": peak_rss_gib(), "machine": machine()})


if __name__ == "__main__":
    main()

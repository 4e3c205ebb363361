"""Why one calibration seed loses more than another: a subpopulation the 32 calibration images may miss.

For a zoo model, finds the test and train images whose activations at a deep layer are far above the typical
(per-image max > `--factor` x the median per-image max), their classes, how many of them each calibration seed's
32 images contain, and repq's default PTQ accuracy on them and on the other images, per seed.

    python benchmarks/calibration_coverage.py                       # fmnist_a0_half_oabn, seeds 0-5 (~3 min)
    python benchmarks/calibration_coverage.py --quick               # quick_a0, seeds 0-1 (seconds)
"""
from __future__ import annotations

import argparse

import torch

from common import machine, repq, write_result
from repq.quant.selection import FloatMode
from zoo import select, zoo, zoo_checkpoint


def per_image_max(model: torch.nn.Module, layer: str, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """max |input| of `layer` per image (float pass)."""
    found: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_pre_hook(
        lambda m, a: found.append(a[0].flatten(1).abs().max(1).values))
    try:
        with torch.no_grad(), FloatMode(model):
            for i in range(0, len(images), batch):
                model(images[i:i + batch])
    finally:
        handle.remove()
    return torch.cat(found)


def predictions(model: torch.nn.Module, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="", help="zoo entry (default fmnist_a0_half_oabn; quick: quick_a0)")
    parser.add_argument("--layer", default="stage4.0.rbr_reparam", help="the deep layer whose input is measured")
    parser.add_argument("--factor", type=float, default=4.0, help="outlier: per-image max > factor x median")
    parser.add_argument("--seeds", type=int, default=6)
    args = parser.parse_args()
    name = select(args.model, args.quick, ["quick_a0" if args.quick else "fmnist_a0_half_oabn"])[0]
    seeds = range(2 if args.quick else args.seeds)
    spec = zoo(args.quick)[name]
    model, _ = repq.load_checkpoint(zoo_checkpoint(name, quick=args.quick))
    train, test = repq.load_dataset(spec["data"], "train"), repq.load_dataset(spec["data"], "test")
    probe = repq.quantize(model, train.calibration_images(8), repq.PTQConfig(activation="minmax", guard=False,
                                                                            bias_correction=False))
    test_images, train_images = test.normalize(test.images), train.normalize(train.images)
    test_max, train_max = per_image_max(probe, args.layer, test_images), per_image_max(probe, args.layer,
                                                                                      train_images)
    threshold = args.factor * float(test_max.median())
    test_out, train_out = test_max > threshold, train_max > threshold
    fp = predictions(model, test_images)
    labels = test.labels
    rows = []
    for seed in seeds:
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:32]  # = calibration_images
        q = repq.quantize(model, train.calibration_images(32, seed), repq.PTQConfig(seed=seed))
        pred = predictions(q, test_images)
        rows.append({"seed": seed, "outliers_in_calibration": int(train_out[idx].sum()),
                     "calibration_max": float(train_max[idx].max()),
                     "drop": float((fp == labels).float().mean() - (pred == labels).float().mean()) * 100,
                     "top1_outliers": float((pred[test_out] == labels[test_out]).float().mean() * 100)
                     if test_out.any() else None,
                     "top1_others": float((pred[~test_out] == labels[~test_out]).float().mean() * 100)})
        print(rows[-1], flush=True)
    classes = torch.bincount(labels[test_out], minlength=len(test.classes)).tolist()
    cmd = "python benchmarks/calibration_coverage.py" + (" --quick" if args.quick else "")
    lines = ["# Calibration coverage: a subpopulation 32 images may miss", "", f"Command: `{cmd}`",
             f"Machine: {machine()}", "",
             f"Model {name}; layer {args.layer}; outlier image: per-image max |input| > {args.factor:g} x the test "
             f"median ({threshold:.1f}). Test outliers: {int(test_out.sum())} of {len(test)} "
             f"({100 * float(test_out.float().mean()):.2f} %), train outliers: {int(train_out.sum())} of "
             f"{len(train)}; their classes (test): "
             + ", ".join(f"{test.classes[i]} {n}" for i, n in enumerate(classes) if n)
             + f". FP top-1 on the outliers: "
             + (f"{float((fp[test_out] == labels[test_out]).float().mean() * 100):.2f}" if test_out.any() else "-")
             + ".", "",
             "| calibration seed | outlier images among the 32 | their largest per-image max | default W8A8 drop | "
             "top-1 on the outliers | top-1 on the other images |", "|---|---|---|---|---|---|"]
    for r in rows:
        outl = "-" if r["top1_outliers"] is None else f"{r['top1_outliers']:.2f}"
        lines.append(f"| {r['seed']} | {r['outliers_in_calibration']} | {r['calibration_max']:.1f} | "
                     f"{r['drop']:+.2f} | {outl} | {r['top1_others']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("calibration_coverage", text, {"rows": rows, "threshold": threshold, "classes": classes,
                                                    "machine": machine(), "command": cmd})


if __name__ == "__main__":
    main()

"""Train (or reuse) the reference RepVGG-A0 on Fashion-MNIST; record FP top-1 of the train-time and fused model.

    python benchmarks/train_reference.py           # ~15 min on 2 cores, cached in runs/
    python benchmarks/train_reference.py --quick   # digits, tiny model, seconds
"""
from __future__ import annotations

import argparse

from common import QUICK_REFERENCE, REFERENCE, machine, reference_checkpoint, repq, timed, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model on digits (seconds)")
    args = parser.parse_args()
    spec = QUICK_REFERENCE if args.quick else REFERENCE
    path = reference_checkpoint(quick=args.quick)
    model, payload = repq.load_checkpoint(path)
    test = repq.load_dataset(spec["data"], "test")
    fp, _ = timed(repq.evaluate, model, test)
    fused = repq.reparameterize(model)
    fz, _ = timed(repq.evaluate, fused, test)
    history = payload["history"]
    seconds = history["seconds"]
    speed = sum(e["images_per_s"] for e in history["epochs"]) / len(history["epochs"])
    rows = [("train-time (multi-branch)", fp["top1"], fp["top5"]), ("fused (plain 3x3 convs)", fz["top1"], fz["top5"])]
    cmd = "python benchmarks/train_reference.py" + (" --quick" if args.quick else "")
    lines = [f"# Reference model: {spec['model']} {spec['model_kwargs']} on {spec['data']}", "",
             f"Command: `{cmd}` (seed {spec['train']['seed']}; recipe {spec['train']})", f"Machine: {machine()}", "",
             "| model | top-1 | top-5 |", "|---|---|---|"]
    lines += [f"| {name} | {t1:.2f} | {t5:.2f} |" for name, t1, t5 in rows]
    lines += ["", f"Training: {len(history['epochs'])} epochs, {seconds / 60:.1f} min, {speed:.0f} images/s.",
              f"Fused vs train-time top-1 difference: {abs(fz['top1'] - fp['top1']):.3f} pt."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("reference", text, {"spec": spec, "fp": fp, "fused": fz, "train_seconds": seconds,
                                         "images_per_s": speed, "epochs": history["epochs"], "machine": machine()})


if __name__ == "__main__":
    main()

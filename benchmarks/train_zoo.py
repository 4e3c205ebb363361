"""Train (or reuse) every model of the zoo (benchmarks/zoo.py) and record its float top-1, train-time and fused.

    python benchmarks/train_zoo.py                 # about an hour on 2 cores, cached in runs/zoo/
    python benchmarks/train_zoo.py --only NAME,..  # some entries
    python benchmarks/train_zoo.py --quick         # the tiny digits zoo (seconds)
"""
from __future__ import annotations

import argparse

from common import machine, repq, write_result
from zoo import select, zoo, zoo_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny digits zoo (seconds)")
    parser.add_argument("--only", default="", help="comma-separated zoo entries (default: all)")
    args = parser.parse_args()
    entries = zoo(args.quick)
    names = select(args.only, args.quick)
    rows = []
    for name in names:
        spec = entries[name]
        model, payload = repq.load_checkpoint(zoo_checkpoint(name, quick=args.quick))
        test = repq.load_dataset(spec["data"], "test")
        fp = repq.evaluate(model, test)["top1"]
        fused = repq.evaluate(repq.reparameterize(model), test)["top1"]
        history = payload["history"]
        rows.append({"name": name, "model": spec["model"], "kwargs": spec["model_kwargs"], "data": spec["data"],
                     "train": spec["train"], "fp_top1": fp, "fused_top1": fused,
                     "train_minutes": history["seconds"] / 60})
        print(f"{name:30s} {fp:6.2f} fused {fused:6.2f}  {history['seconds'] / 60:.1f} min", flush=True)
    cmd = "python benchmarks/train_zoo.py" + (" --quick" if args.quick else "") + (
        f" --only {args.only}" if args.only else "")
    lines = ["# The model zoo", "", f"Command: `{cmd}` (each entry seeds its own initialization and data order)",
             f"Machine: {machine()}", "",
             "| name | model | arguments | data | recipe | FP top-1 | fused top-1 | train min |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["train"]
        recipe = (f"{t['epochs']} ep" + (f" x {t['max_steps_per_epoch']} steps" if t.get("max_steps_per_epoch")
                                         else "")
                  + f", lr {t['lr']}, bs {t['batch_size']}, aug {'on' if t.get('augment', True) else 'off'}, "
                  f"LS {t.get('label_smoothing', 0.0)}, seed {t['seed']}")
        kwargs = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items() if k not in ("num_classes", "in_chans"))
        lines.append(f"| {r['name']} | {r['model']} | {kwargs} | {r['data']} | {recipe} | {r['fp_top1']:.2f} | "
                     f"{r['fused_top1']:.2f} | {r['train_minutes']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("zoo", text, {"rows": rows, "machine": machine()})


if __name__ == "__main__":
    main()

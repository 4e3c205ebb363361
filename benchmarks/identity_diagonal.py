"""Which fused 1x1 kernels carry a merged identity (docs/methods.md, CFWS on 1x1 kernels): per square 1x1 conv of
the zoo's models and the detectors, the share of output channels whose largest |w| sits on the identity diagonal,
and whether repq's CFWS splits it (share >= IDENTITY_DIAGONAL_SHARE). Weights only: runs in seconds.

    python benchmarks/identity_diagonal.py          # zoo + detectors (cached checkpoints; trains missing ones)
    python benchmarks/identity_diagonal.py --quick  # the tiny zoo, prints only
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from common import machine, repq, write_result
from detection_common import detector_checkpoint
from repq.quant.weights import IDENTITY_DIAGONAL_SHARE, carries_identity, identity_diagonal_share
from zoo import select, zoo_checkpoint


@torch.no_grad()
def rows_of(name: str, model: nn.Module) -> list[dict]:
    fused = repq.reparameterize(model)
    rows = []
    for layer, conv in fused.named_modules():
        if isinstance(conv, nn.Conv2d) and (share := identity_diagonal_share(conv.weight, conv.groups)) is not None:
            rows.append({"model": name, "layer": layer, "shape": list(conv.weight.shape), "groups": conv.groups,
                         "share": share, "split": carries_identity(conv.weight.detach(), conv.groups)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = []
    for name in select("", args.quick):
        model, _ = repq.load_checkpoint(zoo_checkpoint(name, quick=args.quick, progress=False))
        rows += rows_of(name, model)
    detectors = ["yolov6n_fmnist", "yolov6n_fmnist_oabn"] if not args.quick else []
    for name in detectors:
        model, _ = repq.load_checkpoint(detector_checkpoint(name, progress=False))
        rows += rows_of(name, model)
    cmd = "python benchmarks/identity_diagonal.py" + (" --quick" if args.quick else "")
    lines = ["# 1x1 kernels with a merged identity", "", f"Command: `{cmd}`", f"Machine: {machine()}", "",
             f"Every square 1x1 conv (O = I) of the fused models: the share of output channels whose largest |w| is "
             f"on the identity diagonal [o, o mod I/g]. CFWS splits the diagonal where the share is at least "
             f"{IDENTITY_DIAGONAL_SHARE:g} (chance: 1 / (I/g)). Models without such convs are not listed.", "",
             "| model | square 1x1 convs | split by CFWS | share, split ones (min-max) | share, others (max) |",
             "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        split = [r["share"] for r in mine if r["split"]]
        other = [r["share"] for r in mine if not r["split"]]
        lines.append(f"| {name} | {len(mine)} | {len(split)} | "
                     + (f"{100 * min(split):.0f}-{100 * max(split):.0f} %" if split else "-") + " | "
                     + (f"{100 * max(other):.0f} %" if other else "-") + " |")
    lines += ["", "| model | layer | shape | groups | share | split |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['groups']} | "
              f"{100 * r['share']:.1f} % | {'yes' if r['split'] else 'no'} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("identity_diagonal", text, {"command": cmd, "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()

"""Fusion you can trust, on third-party layouts: for each one (its source file named), the blocks repq found and
how it fused them, the verified fusion error, PTQ time with repq's default, ONNX export status and ONNX Runtime
parity with the simulation, and what stays in float; plus the cost of verification next to calibration on a
full RepVGG-A0 at 224x224.

The layouts are the reproductions in tests/third_party_layouts.py (random BN statistics, seed 0). Classifiers are
trained briefly on digits (8x8, 120 SGD steps) so that the parity is measured on meaningful predictions; the
YOLOv6-style detector is compared output by output on random 32x32 images.

    python benchmarks/fusion_benchmark.py           # ~2 minutes on 2 cores
    python benchmarks/fusion_benchmark.py --quick   # no A0 at 224x224 (seconds)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import machine, repq, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import third_party_layouts as tp  # noqa: E402
from tests.conftest import randomize_bn as randomize  # noqa: E402

from repq.export import export_onnx  # noqa: E402
from repq.export.verify import _session  # noqa: E402
from repq.reparam import fuse_blocks, fused_blocks  # noqa: E402

CLASSIFIERS = {  # name -> (source file, builder)
    "YOLOv6 QARepVGGBlockV2 (avg-pool branch)": ("meituan/YOLOv6 yolov6/layers/common.py", tp.qarepvgg_v2_net),
    "timm MobileOneBlock with attn (SE)": ("huggingface/pytorch-image-models timm/models/byobnet.py",
                                           tp.timm_mobileone),
    "RepVGGplus (post_se, (x, L2) blocks, aux head)": ("DingXiaoH/RepVGG repvggplus.py", tp.RepVGGplus),
    "original RepVGG-D2se style (SE, view(size(0), -1))": ("DingXiaoH/RepVGG repvgg.py, se_block.py",
                                                           tp.OriginalRepVGG),
}
DETECTORS = {
    "YOLOv6-style N: EfficientRep + SimSPPF + Rep-PAN + decoupled head": (
        "meituan/YOLOv6 yolov6/layers/common.py, models/efficientrep.py, reppan.py, effidehead.py",
        lambda: tp.YOLOv6Like(), ()),
    "same, QARepVGGBlockV2 blocks": ("meituan/YOLOv6 yolov6/layers/common.py",
                                     lambda: tp.YOLOv6Like(block=tp.QARepVGGBlockV2), ()),
    "same, loaded the YOLOv6 way (switch_to_deploy + fuse_model)": (
        "meituan/YOLOv6 yolov6/utils/torch_utils.py fuse_model", lambda: tp.yolov6_fuse_model(
            randomize(tp.YOLOv6Like())), ()),
    "same, ConvTranspose2d upsampling kept in float": ("meituan/YOLOv6 yolov6/layers/common.py Transpose",
                                                       lambda: with_transpose(), ("neck.upsample0.*",)),
}


def with_transpose() -> torch.nn.Module:
    net = tp.YOLOv6Like()
    net.neck.upsample0 = tp.Transpose(16, 16)
    return net


def main_output(out):
    return out["main"] if isinstance(out, dict) else out


def train_briefly(net: torch.nn.Module, train, steps: int = 120) -> torch.nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    step = 0
    while step < steps:
        for x, y in train.batches(64, shuffle=True, seed=step):
            loss = F.cross_entropy(main_output(net(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    return net.eval()


def describe(report: list[dict]) -> tuple[str, int, float | None, float | None]:
    methods: dict[str, int] = {}
    for r in fused_blocks(report):
        methods[r["layout"]] = methods.get(r["layout"], 0) + 1
    network = next((r for r in report if r.get("network")), {})
    folds = sum(1 for r in report if "bn" in r)
    text = ", ".join(f"{n} x {k}" for k, n in methods.items()) or "none (already fused)"
    return text, folds, network.get("relative_diff"), network.get("seconds")


def measure(name: str, source: str, net: torch.nn.Module, calib: torch.Tensor, images: torch.Tensor,
            skip: tuple[str, ...], labels: torch.Tensor | None) -> dict:
    row = {"layout": name, "source": source}
    _, report = fuse_blocks(net, example_input=calib[:2])
    row["blocks"], row["conv_bn_folds"], row["fusion_error"], row["verify_s"] = describe(report)
    start = time.perf_counter()
    q = repq.quantize(net, calib, repq.PTQConfig(num_samples=len(calib), skip_layers=skip))
    row["ptq_s"] = time.perf_counter() - start
    row["float_layers"] = q.repq_quant["float_layers"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = export_onnx(q, Path(tmp) / "m.onnx", calib[:1])
            outs = _session(path).run(None, {"input": images.numpy()})
            row["export"] = "ok"
        except repq.RepqError as err:
            row.update(export=f"refused: {err}", parity=None)
            return row
    with torch.no_grad():
        sim = q(images)
    if labels is not None:   # classifier: argmax agreement of ORT with the simulation
        main = main_output(sim)
        row["parity"] = f"argmax {float((outs[0].argmax(1) == main.argmax(1).numpy()).mean()) * 100:.2f} %"
        row["top1"] = float((main.argmax(1) == labels).float().mean() * 100)
    else:                    # detector: share of output values within 2 % of each output's scale
        sims = [t.numpy() for t in sim]
        share = np.mean([np.mean(np.abs(o - s) <= 1e-3 + 0.02 * np.abs(s).max()) for o, s in zip(outs, sims)])
        row["parity"] = f"{share * 100:.2f} % of outputs within 2 %"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    train, test = repq.load_dataset("digits", "train"), repq.load_dataset("digits", "test")
    calib, images, labels = train.calibration_images(32), test.normalize(test.images), test.labels
    rows = []
    for name, (source, build) in CLASSIFIERS.items():
        torch.manual_seed(0)
        rows.append(measure(name, source, train_briefly(build(), train), calib, images, (), labels))
        print(rows[-1], flush=True)
    gen = torch.Generator().manual_seed(0)
    det_calib, det_images = torch.randn(32, 1, 32, 32, generator=gen), torch.randn(16, 1, 32, 32, generator=gen)
    for name, (source, build, skip) in DETECTORS.items():
        torch.manual_seed(0)
        rows.append(measure(name, source, randomize(build()), det_calib, det_images, skip, None))
        print(rows[-1], flush=True)
    cost = []
    if not args.quick:   # verification cost next to calibration, at ImageNet size
        a0 = randomize(repq.create_model("repvgg_a0", num_classes=1000, in_chans=3))
        x = torch.randn(32, 3, 224, 224, generator=gen)
        _, report = fuse_blocks(a0, example_input=x[:2])
        start = time.perf_counter()
        repq.quantize(a0, x, repq.PTQConfig())
        cost.append({"model": "repq repvgg_a0, 224x224", "verify_s": report[-1]["seconds"],
                     "ptq_s": time.perf_counter() - start})
        print(cost[-1], flush=True)
    cmd = "python benchmarks/fusion_benchmark.py" + (" --quick" if args.quick else "")
    lines = ["# Fusion of third-party layouts", "", f"Command: `{cmd}`", f"Machine: {machine()}, seed 0", "",
             "Layouts: tests/third_party_layouts.py (reproductions with the projects' attribute names, forward "
             "rules and own deploy methods; random BN statistics). Fusion error: max |fused - original| / "
             "max |original| of the whole network in float64, after every fused block was checked the same way. "
             "PTQ: repq's default (equalization + CFWS + auto + bias correction), 32 calibration images. Parity: ONNX Runtime vs "
             "repq's simulation (classifiers trained briefly on digits: argmax on the 360 test images; detectors: "
             "16 random images).", "",
             "| layout | source file | blocks fused (how) | conv+BN folded | fusion error | verify s | PTQ s | "
             "export | ORT parity | kept in float |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "-" if r["fusion_error"] is None else f"{r['fusion_error']:.1e}"
        verify = "-" if r["verify_s"] is None else f"{r['verify_s']:.2f}"
        lines.append(f"| {r['layout']} | {r['source']} | {r['blocks']} | {r['conv_bn_folds']} | {err} | {verify} | "
                     f"{r['ptq_s']:.1f} | {r['export']} | {r['parity']} | {', '.join(r['float_layers']) or '-'} |")
    if cost:
        lines += ["", "Cost of verification (inside `repq.quantize`, which also fuses and verifies):", "",
                  "| model | verification s | whole PTQ s |", "|---|---|---|"]
        lines += [f"| {c['model']} | {c['verify_s']:.2f} | {c['ptq_s']:.1f} |" for c in cost]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("fusion", text, {"rows": rows, "cost": cost, "machine": machine(), "command": cmd})


if __name__ == "__main__":
    main()

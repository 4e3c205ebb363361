"""Real-scale data path: streamed ImageFolder evaluation and PTQ at 224x224 with bounded memory, data pipeline
throughput, and `repq eval --runtime ort` of an INT8 RepVGG-A0 against FP32 eager PyTorch.

    python scale_benchmark.py            # 2k and 20k generated JPEGs, writes docs/results/scale.{md,json}
    python scale_benchmark.py --quick    # tiny folders at 64x64, prints only

Peak memory is the proportional set size of the whole process tree (the repq command plus its DataLoader
workers; pages shared after fork counted once), sampled every 100 ms. The generated folders hold JPEGs of
200-500 px sides (ImageNet-like sizes) whose class is a colour tint over smooth random texture; they are cached
under runs/scale/ (REPQ_CACHE)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import CACHE, machine, write_result

import repq  # noqa: E402  (common puts src/ on the path)

REPQ = [sys.executable, "-c", "import sys; from repq.cli import main; sys.exit(main())"]
# the same command with the streamed datasets' periodic malloc_trim switched off (glibc's plain behaviour)
REPQ_WITHOUT_TRIM = [sys.executable, "-c", "import sys; import repq.data.streaming as s; s.TRIM_EVERY = 1 << 62; "
                     "from repq.cli import main; sys.exit(main())"]
CLASSES = 10


def make_folder(root: Path, val_images: int, train_per_class: int, seed: int = 0) -> Path:
    """An ImageFolder with `val_images` validation JPEGs (cached: rebuilt only when the count differs)."""
    done = root / "done.json"
    spec = {"val": val_images, "train_per_class": train_per_class, "seed": seed}
    if done.exists() and json.loads(done.read_text()) == spec:
        return root
    from PIL import Image
    rng = np.random.default_rng(seed)
    tints = rng.integers(40, 220, (CLASSES, 3))
    for split, counts in (("train", [train_per_class] * CLASSES),
                          ("val", [val_images // CLASSES + (i < val_images % CLASSES) for i in range(CLASSES)])):
        for cls, count in enumerate(counts):
            folder = root / split / f"class_{cls:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = (int(v) for v in rng.integers(200, 500, 2))
                texture = rng.normal(0, 40, (12, 12, 3)) + tints[cls]
                img = Image.fromarray(texture.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
                img.save(folder / f"{i:05d}.jpg", quality=85)
    done.write_text(json.dumps(spec))
    return root


def run_measured(argv: list[str], repq_command: list[str] = REPQ) -> tuple[dict, float, float, float, list[float]]:
    """(the command's --json output, its wall seconds, the peak memory of its process tree in MiB as the sum of
    proportional set sizes (pages shared with forked workers counted once), the peak RSS of the command alone, and
    the tree's peak in each quarter of the run's wall time: flat quarters mean memory does not grow with the
    images read, whatever the run's length)."""
    import psutil
    start = time.perf_counter()
    proc = psutil.Popen([*repq_command, *argv, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    peak_rss = 0
    series: list[tuple[float, int]] = []
    while proc.poll() is None:
        try:
            peak_rss = max(peak_rss, proc.memory_info().rss)
            tree = [proc, *proc.children(recursive=True)]
            series.append((time.perf_counter() - start, sum(p.memory_full_info().pss for p in tree)))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"repq {' '.join(argv)} failed: {err.strip().splitlines()[-1] if err.strip() else ''}")
    seconds = time.perf_counter() - start
    quarters = [max((m for s, m in series if q * seconds / 4 <= s < (q + 1) * seconds / 4), default=0) / 2**20
                for q in range(4)]
    peak_pss = max((m for _, m in series), default=0)
    return json.loads(out.strip().splitlines()[-1]), seconds, peak_pss / 2**20, peak_rss / 2**20, quarters


def ptq_argv(checkpoint: Path, folder: Path, image_size: int, out: Path) -> list[str]:
    """The memory runs' `repq ptq` (default recipe, batch 64, every image of the folder evaluated)."""
    return ["ptq", "--checkpoint", str(checkpoint), "--data", f"imagefolder:{folder}", "--image-size",
            str(image_size), "--batch-size", "64", "--out", str(out), "--overwrite"]


def saved_results() -> dict:
    from common import RESULTS
    results = json.loads((RESULTS / "scale.json").read_text())
    results.setdefault("image_size", 224)
    results.setdefault("throughput_images", 512)
    results.setdefault("command", "python benchmarks/scale_benchmark.py")
    return results


def pipeline_throughput(folder: Path, size: int, workers: int, images: int) -> float:
    data = repq.load_dataset(f"imagefolder:{folder}", "test", image_size=size, workers=workers)
    data = data.subset(min(images, len(data)))
    start, n = time.perf_counter(), 0
    for batch, _ in data.batches(64):
        n += len(batch)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default="2000,20000", help="validation images of the generated folders")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--throughput-images", type=int, default=512, help="images of the images/s runs")
    parser.add_argument("--render-only", action="store_true", help="rewrite scale.md from the saved scale.json")
    parser.add_argument("--no-trim-probe", action="store_true",
                        help="only re-run `repq ptq` on the largest folder without repq's periodic return of freed "
                             "heap pages (repq.data.memory) and add it to the saved scale.json and scale.md")
    args = parser.parse_args()
    if args.no_trim_probe:
        results = saved_results()
        work = CACHE / "scale"
        n = max(m["images"] for m in results["memory"])
        folder = work / f"imagefolder_{n}"
        if not (folder / "done.json").exists():
            raise SystemExit(f"{folder} is missing: run `python benchmarks/scale_benchmark.py` first")
        _, seconds, peak, main_rss, quarters = run_measured(
            ptq_argv(work / "a0_quarter_fp.pt", folder, results["image_size"], work / "small_int8_probe.pt"),
            repq_command=REPQ_WITHOUT_TRIM)
        results["no_trim_probe"] = {"command": "python benchmarks/scale_benchmark.py --no-trim-probe",
                                    "machine": machine(), "images": n, "ptq_peak_mib": peak,
                                    "ptq_main_rss_mib": main_rss, "ptq_seconds": seconds,
                                    "ptq_quarter_peaks_mib": quarters}
        write_result("scale", render(results), results)
        print(render(results))
        return
    if args.render_only:
        results = saved_results()
        write_result("scale", render(results), results)
        return
    sizes = [60, 120] if args.quick else [int(s) for s in args.sizes.split(",")]
    image_size = 64 if args.quick else args.image_size
    n_speed = 64 if args.quick else args.throughput_images
    work = CACHE / ("scale_quick" if args.quick else "scale")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    folders = {n: make_folder(work / f"imagefolder_{n}", n, 4 if args.quick else 16) for n in sizes}
    # a small model for the memory runs (every image of the folder goes through it), the real A0 for speed
    small, a0 = work / "a0_quarter_fp.pt", work / "a0_fp.pt"
    repq.save_checkpoint(small, repq.create_model("repvgg_a0", num_classes=CLASSES, width_scale=0.25))
    repq.save_checkpoint(a0, repq.create_model("repvgg_a0", num_classes=CLASSES))

    memory = []
    for n, folder in folders.items():
        data = ["--data", f"imagefolder:{folder}", "--image-size", str(image_size)]
        ev, ev_s, ev_mb, ev_main, ev_q = run_measured(["eval", "--checkpoint", str(small), *data,
                                                       "--batch-size", "64"])
        out = work / f"small_int8_{n}.pt"
        pq, pq_s, pq_mb, pq_main, pq_q = run_measured(ptq_argv(small, folder, image_size, out))
        memory.append({"images": n, "eval_peak_mib": ev_mb, "eval_main_rss_mib": ev_main, "eval_seconds": ev_s,
                       "eval_n": ev["results"]["train"]["n"], "ptq_peak_mib": pq_mb, "ptq_main_rss_mib": pq_main,
                       "ptq_seconds": pq_s, "ptq_n": pq["fp"]["n"], "eval_quarter_peaks_mib": ev_q,
                       "ptq_quarter_peaks_mib": pq_q})
        print(f"{n} images: eval {ev_mb:.0f} MiB ({ev_s:.0f} s), ptq {pq_mb:.0f} MiB ({pq_s:.0f} s)", flush=True)

    biggest = folders[max(sizes)]
    pipeline = {w: pipeline_throughput(biggest, image_size, w, 4 * n_speed if not args.quick else 64)
                for w in (0, 1, 2)}

    # FP32 eager (repq's fused float model) vs the min-max INT8 model in ONNX Runtime, same images, batch 64
    data = ["--data", f"imagefolder:{biggest}", "--image-size", str(image_size), "--eval-limit", str(n_speed),
            "--batch-size", "64"]
    int8 = work / "a0_int8_minmax.pt"
    run_measured(["ptq", "--checkpoint", str(a0), *data, "--weight", "minmax", "--activation", "percentile",
                  "--quantize-pool", "--no-bias-correction", "--out", str(int8), "--overwrite"])
    fp_eval = run_measured(["eval", "--checkpoint", str(a0), *data, "--runtime", "ort"])[0]
    q_eval = run_measured(["eval", "--checkpoint", str(int8), *data, "--runtime", "ort"])[0]
    speed = {"fp32 eager (fused)": fp_eval["results"]["fused"],
             "fp32 ONNX Runtime": fp_eval["results"]["fused in ONNX Runtime"],
             "int8 simulation (repq)": q_eval["results"]["quantized"],
             "int8 ONNX Runtime": q_eval["results"]["quantized in ONNX Runtime"]}
    ratio = speed["int8 ONNX Runtime"]["images_per_s"] / speed["fp32 eager (fused)"]["images_per_s"]

    command = "python benchmarks/scale_benchmark.py" + (" --quick" if args.quick else "")
    results = {"command": command, "machine": machine(), "image_size": image_size, "throughput_images": n_speed,
               "memory": memory, "pipeline_images_per_s": pipeline, "speed": speed, "ort_int8_vs_fp32_eager": ratio}
    text = render(results)
    print(text)
    if not args.quick:
        write_result("scale", text, results)


def render(r: dict) -> str:
    """The markdown page of a run's results (also from a saved scale.json: --render-only)."""
    image_size, memory, speed = r["image_size"], r["memory"], r["speed"]
    lines = [f"# Real-scale data: streamed ImageFolder at {image_size}x{image_size}", "",
             f"Command: `{r['command']}`", f"Machine: {r['machine']}", "",
             f"## Peak memory, {image_size}x{image_size}", "",
             "Peak of the summed proportional set size (PSS) of the command and its 2 DataLoader workers (pages a "
             "forked worker shares with the command counted once), and the peak RSS of the command alone; sampled "
             "every 100 ms.", "",
             "Model: RepVGG-A0 at quarter width (10 classes), so that every image of the folder passes through it "
             "in minutes; batch 64. `repq eval` runs the train-time and the fused model over all images; `repq ptq` "
             "(default recipe) calibrates on 32 train images and evaluates FP and INT8 over all images.", "",
             "| val images | repq eval: peak MiB (command + workers) | command alone | s | repq ptq: peak MiB "
             "(command + workers) | command alone | s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {m['images']} | {m['eval_peak_mib']:.0f} | {m['eval_main_rss_mib']:.0f} | {m['eval_seconds']:.0f} | "
              f"{m['ptq_peak_mib']:.0f} | {m['ptq_main_rss_mib']:.0f} | {m['ptq_seconds']:.0f} |" for m in memory]
    small, big = memory[0], memory[-1]
    lines += ["", f"{big['images'] // small['images']}x the images: peak {big['eval_peak_mib'] - small['eval_peak_mib']:+.0f} "
              f"MiB for eval, {big['ptq_peak_mib'] - small['ptq_peak_mib']:+.0f} MiB for ptq (the peak of a "
              f"{big['images'] // small['images']}x longer run of the same batches); nothing is held per image but its "
              "path and label."]
    if all("eval_quarter_peaks_mib" in m for m in memory):
        lines += ["", "Peak (command + workers, MiB) within each quarter of the run's wall time: growth with the "
                  "images read would show as rising quarters.", "",
                  "| val images | repq eval, quarters 1-4 | repq ptq, quarters 1-4 |", "|---|---|---|"]
        lines += [f"| {m['images']} | {' / '.join(f'{v:.0f}' for v in m['eval_quarter_peaks_mib'])} | "
                  f"{' / '.join(f'{v:.0f}' for v in m['ptq_quarter_peaks_mib'])} |" for m in memory]
    probe = r.get("no_trim_probe")
    if probe:
        base = next(m for m in memory if m["images"] == probe["images"])
        lines += ["", "Why the peak does not grow: glibc raises its mmap threshold each time a large block is freed, "
                  "after which blocks of that size (decoded images, batches, activations) come from the heap, and "
                  "the free pages between them stay with the process. The streamed datasets therefore return the "
                  "heap's free pages to the system (`malloc_trim`) every 64 images (once a batch at batch 64), in the "
                  f"command and in each worker. Without it (`{probe['command']}`, {probe['machine']}), `repq ptq` on the "
                  f"{probe['images']} images peaks at {probe['ptq_peak_mib']:.0f} MiB (quarters "
                  f"{' / '.join(f'{v:.0f}' for v in probe['ptq_quarter_peaks_mib'])}; command alone "
                  f"{probe['ptq_main_rss_mib']:.0f}) instead of {base['ptq_peak_mib']:.0f}, in "
                  f"{probe['ptq_seconds']:.0f} s instead of {base['ptq_seconds']:.0f} s. The cost is per image read, not per "
                  "operation of the model, so it shrinks with larger models."]
    lines += ["", f"## Data pipeline throughput ({image_size}x{image_size}, decode + resize + center crop + "
              "normalize, batch 64)", "", "| DataLoader workers | images/s |", "|---|---|"]
    lines += [f"| {w} | {v:.0f} |" for w, v in r["pipeline_images_per_s"].items()]
    lines += ["", f"## Model throughput, full-width RepVGG-A0, {r['throughput_images']} images at "
              f"{image_size}x{image_size}, batch 64", "",
              "images/s counts the forward passes only; with data adds waiting for decoded images (2 workers "
              "sharing the 2 cores).", "",
              "| model | top-1 | images/s | with data images/s |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['top1']:.2f} | {v['images_per_s']:.1f} | {v['n'] / v['seconds']:.1f} |"
              for k, v in speed.items()]
    lines += ["", f"INT8 in ONNX Runtime vs FP32 eager PyTorch: **{r['ort_int8_vs_fp32_eager']:.2f}x** images/s "
              "(min-max weights, percentile activations, `--quantize-pool`: every conv a QLinearConv). The models "
              "are untrained (random weights): top-1 is not the point here, throughput and memory are.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

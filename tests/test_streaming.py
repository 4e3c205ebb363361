"""Streamed image data: the ImageNet transforms against hand-computed resize + crop boxes, seeded training crops,
corrupt files named in one line (or skipped and counted), file lists, shards, and the pretrained-checkpoint path
at 224x224 end to end (import -> ptq -> eval in ONNX Runtime -> export --verify) on generated JPEGs."""
import json
import platform
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import repq
from repq.cli import main
from repq.data.transforms import ImageTransform, eval_transform, random_resized_crop_box, train_transform


def make_folder(root, per_class=(6, 3), sizes=((40, 30), (30, 50), (64, 64)), classes=("red", "green", "blue")):
    """JPEGs of varied sizes whose class is their colour (plus noise)."""
    rng = np.random.default_rng(0)
    colors = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
    for split, n in zip(("train", "val"), per_class):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = sizes[i % len(sizes)]
                arr = (rng.normal(0, 20, (h, w, 3)) + np.array(colors[cls])).clip(0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i}.jpg", quality=90)
    return root


def test_eval_transform_is_resize_shorter_side_then_center_crop():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))   # 300 wide, 200 high
    out = eval_transform(img, ImageTransform(size=224, crop_pct=0.875))
    # by hand: shorter side 200 -> floor(224 / 0.875) = 256, longer 300 -> int(256 * 300 / 200) = 384;
    # crop 224 x 224 from the center: left round((384 - 224) / 2) = 80, top round((256 - 224) / 2) = 16
    expected = np.asarray(img.resize((384, 256), Image.BILINEAR).crop((80, 16, 304, 240))).transpose(2, 0, 1)
    assert out.shape == (3, 224, 224) and np.array_equal(out, expected)
    tall = Image.fromarray(rng.integers(0, 255, (90, 45, 3), dtype=np.uint8))    # 45 wide, 90 high, size 32 / 1.0
    out = eval_transform(tall, ImageTransform(size=32, crop_pct=1.0, interpolation="bicubic"))
    expected = np.asarray(tall.resize((32, 64), Image.BICUBIC).crop((0, 16, 32, 48))).transpose(2, 0, 1)
    assert np.array_equal(out, expected)


def test_random_resized_crop_is_seeded_and_inside_the_image():
    t = ImageTransform(size=16)
    for width, height in ((50, 40), (300, 20), (20, 300), (7, 7)):
        rng = random.Random(3)
        for _ in range(50):
            left, top, w, h = random_resized_crop_box(width, height, rng, t.scale, t.ratio)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height and w > 0 and h > 0
    # a very wide image cannot fit the aspect range: the fallback is the central crop of aspect 4/3, full height
    assert random_resized_crop_box(300, 20, random.Random(0), (0.99, 1.0), t.ratio) == (136, 0, 27, 20)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    a, b = (train_transform(img, t, random.Random("5:1")) for _ in range(2))
    assert a.shape == (3, 16, 16) and np.array_equal(a, b)
    assert not all(np.array_equal(a, train_transform(img, t, random.Random(f"5:{i}"))) for i in range(2, 6))


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_folder_batches_shards_and_calibration(tmp_path, workers):
    make_folder(tmp_path)
    t = ImageTransform(size=24)
    train = repq.load_dataset(f"imagefolder:{tmp_path}", "train", transform=t, workers=workers)
    test = repq.load_dataset(f"imagefolder:{tmp_path}", "test", transform=t, workers=workers)
    assert len(train) == 18 and len(test) == 9 and train.classes == ["blue", "green", "red"]
    assert train.input_size == [3, 24, 24] and train.num_classes == 3 and test.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    images, labels = next(test.batches(4))
    # the first val image, decoded and normalized independently
    with Image.open(tmp_path / "val" / "blue" / "0.jpg") as img:
        ref = torch.from_numpy(eval_transform(img.convert("RGB"), t)).float() / 255
    mean, std = torch.tensor(t.mean).reshape(3, 1, 1), torch.tensor(t.std).reshape(3, 1, 1)
    assert images.shape == (4, 3, 24, 24) and torch.allclose(images[0], (ref - mean) / std, atol=1e-6)
    assert labels.tolist() == [0, 0, 0, 1]
    # training crops repeat with the seed and change with it; the shards of two ranks are disjoint and equal
    first = [x for x, _ in train.batches(6, shuffle=True, seed=1, augment=True)]
    again = [x for x, _ in train.batches(6, shuffle=True, seed=1, augment=True)]
    other = [x for x, _ in train.batches(6, shuffle=True, seed=2, augment=True)]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not torch.equal(first[0], other[0])
    shards = [torch.cat([lbl for _, lbl in train.batches(4, shuffle=True, seed=3, rank=r, world_size=2)])
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 9
    c1, c2 = train.calibration_images(5, seed=0), train.calibration_images(5, seed=0)
    assert c1.shape == (5, 3, 24, 24) and torch.equal(c1, c2) and not torch.equal(c1, train.calibration_images(5, 1))
    small = test.subset(4)
    assert len(small) == 4 and len(set(small.labels.tolist())) > 1   # spread over the classes, not the first four


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path, workers):
    make_folder(tmp_path)
    (tmp_path / "val" / "green" / "broken.jpg").write_bytes(b"not a jpeg")
    test = repq.load_dataset(f"imagefolder:{tmp_path}", "test", image_size=16, workers=workers)
    with pytest.raises(repq.RepqError, match=r"broken\.jpg \(UnidentifiedImageError\).*--skip-corrupt") as err:
        list(test.batches(4))
    assert "\n" not in str(err.value)
    test = repq.load_dataset(f"imagefolder:{tmp_path}", "test", image_size=16, workers=workers, skip_corrupt=True)
    labels = torch.cat([lbl for _, lbl in test.batches(4)])
    assert len(labels) == 9 and len(test.skipped) == 1 and "broken.jpg" in next(iter(test.skipped))


def test_file_list_and_its_errors(tmp_path):
    make_folder(tmp_path / "imgs")
    lines = {"train": [], "val": []}
    for split in lines:
        for label, cls in enumerate(("red", "green", "blue")):
            lines[split] += [f"imgs/{split}/{cls}/{i}.jpg {label}" for i in range(3 if split == "val" else 6)]
        (tmp_path / f"{split}.txt").write_text("\n".join(lines[split]) + "\n")
    data = repq.load_dataset(f"filelist:{tmp_path}", "test", image_size=16)
    assert data.classes == ["0", "1", "2"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert next(data.batches(9))[0].shape == (9, 3, 16, 16)
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\n")
    assert repq.load_dataset(f"filelist:{tmp_path}", "train").classes == ["red", "green", "blue"]
    (tmp_path / "val.txt").write_text("imgs/val/red/0.jpg 0\nimgs/val/red/1.jpg\n")
    with pytest.raises(repq.RepqError, match=r"val.txt line 2: expected"):
        repq.load_dataset(f"filelist:{tmp_path}", "test")
    (tmp_path / "val.txt").write_text("imgs/val/red/0.jpg 7\n")
    with pytest.raises(repq.RepqError, match="labels go up to 7 but there are 3 classes"):
        repq.load_dataset(f"filelist:{tmp_path}", "test")


def test_cli_data_flags_are_checked(tmp_path, capsys):
    make_folder(tmp_path / "f")
    ckpt = tmp_path / "m.pt"
    repq.save_checkpoint(ckpt, repq.create_model("repvgg_a0", num_classes=3, width_scale=0.125))
    for argv, needle in (
            (["eval", "--checkpoint", str(ckpt), "--data", "digits", "--crop-pct", "0.9"], "--crop-pct applies to "
             "imagefolder and filelist data only"),
            (["eval", "--checkpoint", str(ckpt), "--data", f"imagefolder:{tmp_path / 'f'}", "--crop-pct", "1.5"],
             "--crop-pct: must be <= 1"),
            (["eval", "--checkpoint", str(ckpt), "--data", f"imagefolder:{tmp_path / 'f'}", "--mean", "0.5,0.5"],
             "--mean: expected 1 or 3"),
            (["eval", "--checkpoint", str(ckpt), "--data", f"imagefolder:{tmp_path / 'f'}", "--mean", "0.5"],
             "one value per channel")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_pretrained_checkpoint_end_to_end_at_224(tmp_path, capsys):
    """An original-layout RepVGG-A0 checkpoint -> repq import -> repq ptq at 224x224 on a generated ImageFolder
    of JPEGs of varied sizes -> repq eval (simulation and ONNX Runtime) -> repq export --verify."""
    folder = make_folder(tmp_path / "data", per_class=(34, 8), sizes=((300, 220), (180, 260), (256, 256), (500, 375)))
    torch.manual_seed(0)
    torch.save({"state_dict": repq.create_model("repvgg_a0", num_classes=3).state_dict()}, tmp_path / "orig.pth")
    data = f"imagefolder:{folder}"
    run = [("import", "--weights", str(tmp_path / "orig.pth"), "--model", "repvgg_a0", "--num-classes", "3",
            "--out", str(tmp_path / "a0.pt")),
           ("ptq", "--checkpoint", str(tmp_path / "a0.pt"), "--data", data, "--image-size", "224", "--weight",
            "minmax", "--activation", "percentile", "--quantize-pool", "--no-bias-correction", "--out",
            str(tmp_path / "a0_int8.pt")),
           ("eval", "--checkpoint", str(tmp_path / "a0_int8.pt"), "--data", data, "--runtime", "ort"),
           ("export", "--checkpoint", str(tmp_path / "a0_int8.pt"), "--data", data, "--onnx",
            str(tmp_path / "a0.onnx"), "--verify")]
    results = []
    for argv in run:
        assert main([*argv, "--json"]) == 0, capsys.readouterr().err
        results.append(json.loads(capsys.readouterr().out))
    ptq, evaluated, exported = results[1:]
    payload = repq.load_checkpoint(tmp_path / "a0_int8.pt")[1]
    assert payload["data_meta"]["input_size"] == [3, 224, 224]            # recorded, and reused by eval/export
    assert payload["data_meta"]["transform"] == {"size": 224, "crop_pct": 0.875, "interpolation": "bilinear"}
    assert ptq["fp"]["n"] == evaluated["results"]["quantized"]["n"] == exported["verify"]["n"] == 24
    sim, ort = evaluated["results"]["quantized"], evaluated["results"]["quantized in ONNX Runtime"]
    assert sim["top1"] == pytest.approx(ptq["results"][0]["top1"]) and ort["images_per_s"] > 0
    assert exported["kernels"].get("QLinearConv", 0) == 22 and exported["verify"]["passed"]
    assert exported["verify"]["argmax_agreement"] >= 95.0


def test_train_qat_analyze_on_a_streamed_folder(tmp_path, capsys):
    """repq train / qat / analyze / eval on imagefolder data (workers, train transform), the transform recorded and
    reused, and --skip-corrupt reported on stderr."""
    folder = make_folder(tmp_path / "data", per_class=(8, 4))
    (folder / "val" / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    data = f"imagefolder:{folder}"
    fp, q = str(tmp_path / "fp.pt"), str(tmp_path / "q.pt")
    assert main(["train", "--model", "repvgg_a0", "--width-scale", "0.125", "--data", data, "--image-size", "32",
                 "--crop-pct", "0.9", "--epochs", "2", "--batch-size", "8", "--skip-corrupt", "--out", fp,
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert "--skip-corrupt left out 1 unreadable image" in captured.err and "broken.jpg" in captured.err
    meta = repq.load_checkpoint(fp)[1]["data_meta"]
    assert meta["transform"] == {"size": 32, "crop_pct": 0.9, "interpolation": "bilinear"}
    assert main(["qat", "--checkpoint", fp, "--data", data, "--epochs", "1", "--batch-size", "8", "--calib", "8",
                 "--skip-corrupt", "--out", q, "--json"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", q, "--data", data]) == 2     # without --skip-corrupt: one line, exit 2
    err = capsys.readouterr().err.strip()
    assert "broken.jpg (UnidentifiedImageError)" in err and len(err.splitlines()) == 1
    out = tmp_path / "report"
    assert main(["analyze", "--checkpoint", fp, "--data", data, "--calib", "8", "--skip-corrupt", "--out", str(out),
                 "--json"]) == 0   # image size and crop recorded in the checkpoint: no flags needed
    assert (out / "report.md").exists()


GLIBC_HEAP_PROBE = r"""
import ctypes, ctypes.util, json, sys
sys.path[:0] = [sys.argv[1]]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
page = libc.getpagesize() if hasattr(libc, "getpagesize") else 4096
from repq.data.memory import release_free_memory   # imports torch: before the measured blocks
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * page / 2**20
# free one mmapped 30 MiB block: glibc raises its mmap threshold, so the 4 MiB blocks below come from the heap
libc.free(libc.malloc(30 << 20))
blocks = [libc.malloc(4 << 20) for _ in range(64)]
for b in blocks:
    ctypes.memset(b, 1, 4 << 20)
keep = libc.malloc(4 << 20)   # holds the top of the heap, so free() cannot shrink it by itself
ctypes.memset(keep, 1, 4 << 20)
for b in blocks:
    libc.free(b)
before = resident_mib()
released = release_free_memory()
print(json.dumps({"before": before, "after": resident_mib(), "released": released}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_free_heap_pages_go_back_to_the_system(tmp_path):
    """256 MiB freed in the middle of glibc's heap stay resident until release_free_memory returns them."""
    src = str(Path(repq.__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", GLIBC_HEAP_PROBE, src], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["released"] and probe["before"] - probe["after"] > 200, probe


def test_streamed_batches_release_free_memory_every_trim_every_images(tmp_path, monkeypatch):
    """The main process returns freed pages once per TRIM_EVERY images read (with workers=0 the reader, which
    then runs in the main process, leaves it to the batch loop)."""
    import repq.data.streaming as streaming
    make_folder(tmp_path, per_class=(2, 8))
    calls = []
    monkeypatch.setattr(streaming, "release_free_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(streaming, "TRIM_EVERY", 4)
    test = repq.load_dataset(f"imagefolder:{tmp_path}", "test", transform=ImageTransform(size=16), workers=0)
    assert sum(len(lbl) for _, lbl in test.batches(2)) == 24
    assert len(calls) == 24 // 4

"""Every user mistake of issue 14 (and siblings), table-driven: exit code 2, one line on stderr naming the flag, no
traceback, no output created or changed, and refused within a couple of seconds (before data loading or any
training). Plus the checks that must fail loudly: `export --verify` and `eval --min-top1`."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

import repq
from repq.checkpoint import read_checkpoint
from repq.cli import main
from tests.conftest import tiny


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained float checkpoint (2 epochs, with its data recorded) and a quantized one, made once."""
    root = tmp_path_factory.mktemp("cli_reliability")
    fp = root / "fp.pt"
    assert main(["train", "--data", "digits", "--epochs", "2", "--max-steps", "3", "--batch-size", "32",
                 "--small-input", "--width-scale", "0.125", "--out", str(fp), "--json"]) == 0
    q = root / "q.pt"
    assert main(["ptq", "--checkpoint", str(fp), "--data", "digits", "--calib", "8", "--activation", "minmax",
                 "--out", str(q), "--json"]) == 0
    return {"CKPT": fp, "QCKPT": q}


def _edited(root, source, edit, name):
    payload = read_checkpoint(source)
    edit(payload)
    path = root / name
    torch.save(payload, path)
    return path


def _nan_scale(payload):
    name = next(iter(payload["quant"]["layers"]))
    payload["quant"]["layers"][name]["input_scale"] = float("nan")


def _huge(payload):   # a small file whose config claims a model far larger than its state dict
    payload["model"]["width_scale"] = 64.0


CASES = [
    # output paths
    (["train", "--data", "digits", "--out", "DIR"], "--out", "is a folder"),
    (["train", "--data", "digits", "--out", "NEWDIR/"], "--out", "is a folder"),
    (["train", "--data", "digits", "--out", "EXIST"], "--out", "--overwrite"),
    (["train", "--data", "digits", "--out", "READONLY", "--overwrite"], "--out", "read-only"),
    (["train", "--data", "digits", "--out", "EXIST/x.pt"], "--out", "is a file, not a folder"),
    (["qat", "--checkpoint", "CKPT", "--data", "digits", "--out", "DIR"], "--out", "is a folder"),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--out", "DIR"], "--out", "is a folder"),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--out", "CKPT", "--overwrite"], "--out", "input"),
    (["analyze", "--checkpoint", "CKPT", "--data", "digits", "--out", "EXIST"], "--out", "is a file"),
    (["analyze", "--checkpoint", "CKPT", "--data", "digits", "--out", "FULLDIR"], "--out", "--overwrite"),
    (["demo", "--out", "EXIST"], "--out", "is a file"),
    (["export", "--checkpoint", "QCKPT", "--onnx", "EXIST"], "--onnx", "--overwrite"),
    (["export", "--checkpoint", "QCKPT", "--onnx", "READONLY", "--overwrite"], "--onnx", "read-only"),
    (["export", "--checkpoint", "NODATAQ", "--onnx", "EXIST", "--overwrite", "--verify"], "--verify",
     "needs --data"),
    (["import", "--weights", "CKPT", "--model", "repvgg_a0", "--out", "DIR"], "--out", "is a folder"),
    # input paths
    (["eval", "--checkpoint", "DIR", "--data", "digits"], "--checkpoint", "is a directory"),
    (["eval", "--checkpoint", "", "--data", "digits"], "--checkpoint", "is empty"),
    (["eval", "--checkpoint", "NEW", "--data", "digits"], "--checkpoint", "not found"),
    (["train", "--data", "digits", "--resume", "DIR", "--out", "NEW"], "--resume", "is a directory"),
    # values out of range
    (["train", "--data", "digits", "--width-scale", "0", "--out", "NEW"], "--width-scale", "must be >"),
    (["train", "--data", "digits", "--width-scale", "-1", "--out", "NEW"], "--width-scale", "must be >"),
    (["train", "--data", "digits", "--width-scale", "0.001", "--out", "NEW"], "--model", "no channels"),
    (["train", "--data", "digits", "--label-smoothing", "2", "--out", "NEW"], "--label-smoothing", "must be <"),
    (["train", "--data", "digits", "--image-size", "0", "--out", "NEW"], "--image-size", "must be >="),
    (["train", "--data", "digits", "--max-steps", "-1", "--out", "NEW"], "--max-steps", "must be >="),
    (["train", "--data", "digits", "--epochs", "0", "--out", "NEW"], "--epochs", "must be >="),
    (["train", "--data", "digits", "--lr", "nan", "--out", "NEW"], "--lr", "finite"),
    (["train", "--data", "digits", "--oabn-rule", "relative", "--out", "NEW"], "--oabn-rule", "add --oabn"),
    (["eval", "--checkpoint", "CKPT", "--data", "digits", "--eval-limit", "0"], "--eval-limit", "must be >="),
    (["eval", "--checkpoint", "CKPT", "--data", "digits", "--eval-limit", "-1"], "--eval-limit", "must be >="),
    (["analyze", "--checkpoint", "CKPT", "--data", "digits", "--bits", "1", "--out", "NEWDIR"], "--bits", ">="),
    (["analyze", "--checkpoint", "CKPT", "--data", "digits", "--calib", "0", "--out", "NEWDIR"], "--calib", ">="),
    (["demo", "--epochs", "0", "--out", "NEWDIR"], "--epochs", "must be >="),
    (["qat", "--checkpoint", "CKPT", "--data", "digits", "--epochs", "0", "--out", "NEW"], "--epochs", ">="),
    (["qat", "--checkpoint", "CKPT", "--data", "digits", "--method", "lsq", "--refit-every", "5", "--out", "NEW"],
     "--refit-every", "--method cluster only"),
    (["qat", "--checkpoint", "CKPT", "--data", "digits", "--w-bits", "1", "--out", "NEW"], "--w-bits", ">="),
    (["qat", "--checkpoint", "CKPT", "--data", "digits", "--distill", "1", "--out", "NEW"], "--distill",
     "applies to detectors"),
    (["qat", "--checkpoint", "CKPT", "--data", "digits", "--distill", "-1", "--out", "NEW"], "--distill", ">="),
    (["qat", "--checkpoint", "CKPT", "--data", "digits", "--warmup-epochs", "-0.1", "--out", "NEW"],
     "--warmup-epochs", ">="),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--skip-layers", "nothing.*"], "--skip-layers",
     "matches no layer"),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--edge-bits", "1"], "--edge-bits", "2 to 16"),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--edge-bits", "16", "--cfws-deploy", "two-branch"],
     "--edge-bits", "at most 8"),
    # devices
    (["train", "--data", "digits", "--device", "tpu", "--out", "NEW"], "--device", "expected auto, cpu"),
    (["train", "--data", "digits", "--device", "meta", "--out", "NEW"], "--device", "cpu or cuda"),
    (["train", "--data", "digits", "--device", "cpu", "--amp", "bf16", "--out", "NEW"], "--amp", "CUDA"),
    *([] if torch.cuda.is_available() else [
        (["eval", "--checkpoint", "CKPT", "--data", "digits", "--device", "cuda"], "--device", "no CUDA device"),
        (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--device", "cuda:1"], "--device", "no CUDA device")]),
    # wrong combinations and checkpoints
    (["export", "--checkpoint", "QCKPT", "--onnx", "NEW", "--fp"], "--fp", "is quantized"),
    (["export", "--checkpoint", "CKPT", "--onnx", "NEW", "--fp", "--bench"], "--bench", "drop --fp"),
    (["eval", "--checkpoint", "CKPT", "--data", "digits", "--image-size", "64"], "--image-size",
     "imagefolder and filelist data only"),
    (["eval", "--checkpoint", "CKPT", "--data", "digits", "--workers", "-1"], "--workers", "must be >="),
    (["train", "--data", "digits", "--resume", "CKPT", "--epochs", "2", "--out", "NEW"], "--resume",
     "already has 2 epochs"),
    (["ptq", "--checkpoint", "QCKPT", "--data", "digits"], "already quantized", "already quantized"),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--compare", "--w-bits", "8,6", "--out", "NEW"], "--out",
     "saves one"),
    (["eval", "--checkpoint", "OTHERDATA", "--data", "digits"], "--data", "does not match"),
    (["eval", "--checkpoint", "NANSCALE", "--data", "digits"], "NANSCALE", "invalid input scale"),
    (["export", "--checkpoint", "NANSCALE", "--onnx", "NEW", "--data", "digits", "--verify"], "NANSCALE",
     "invalid input scale"),
    (["eval", "--checkpoint", "NEGCLASSES", "--data", "digits"], "NEGCLASSES", "damaged"),
    (["eval", "--checkpoint", "NOMODEL", "--data", "digits"], "NOMODEL", "no valid model config"),
    (["eval", "--checkpoint", "BADQUANT", "--data", "digits"], "BADQUANT", "damaged"),
    (["eval", "--checkpoint", "HUGE", "--data", "digits"], "HUGE", "does not fit"),
]


def _materialize(argv, files, tmp_path):
    """Put real paths in place of the placeholders; returns argv and the placeholders' paths."""
    root = files["CKPT"].parent
    paths = {"CKPT": files["CKPT"], "QCKPT": files["QCKPT"], "DIR": tmp_path / "adir", "NEW": tmp_path / "new.pt",
             "NEWDIR": tmp_path / "newdir", "EXIST": tmp_path / "exist.bin", "READONLY": tmp_path / "ro.bin",
             "FULLDIR": tmp_path / "full"}
    paths["DIR"].mkdir()
    paths["FULLDIR"].mkdir()
    (paths["FULLDIR"] / "report.md").write_text("an earlier report")
    paths["EXIST"].write_bytes(b"precious")
    paths["READONLY"].write_bytes(b"read-only")
    os.chmod(paths["READONLY"], 0o444)
    edits = {"OTHERDATA": lambda p: p["data_meta"].update(name="fashion-mnist"),
             "NANSCALE": _nan_scale, "NEGCLASSES": lambda p: p["model"].update(num_classes=-3),
             "NOMODEL": lambda p: p.pop("model"), "HUGE": _huge, "NODATAQ": lambda p: p.pop("data"),
             "BADQUANT": lambda p: p["quant"]["layers"].update({"nowhere.conv": {"coarse": None}})}
    for name, edit in edits.items():
        source = files["QCKPT"] if name in ("NANSCALE", "BADQUANT", "NODATAQ") else files["CKPT"]
        paths[name] = root / f"{name.lower()}.pt"
        if not paths[name].exists():
            _edited(root, source, edit, paths[name].name)
    out = []
    for a in argv:
        head, _, rest = a.partition("/")
        out.append(str(paths[head]) + (("/" + rest) if rest else ("/" if a.endswith("/") else ""))
                   if head in paths else a)
    return out, paths


def _snapshot(folder):
    return {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mode) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("argv,flag,needle", CASES, ids=[" ".join(c[0][:1] + c[0][-3:]) for c in CASES])
def test_user_mistake_is_one_line_before_any_work(argv, flag, needle, files, tmp_path, capsys):
    argv, paths = _materialize(argv, files, tmp_path)
    for placeholder in ("NANSCALE", "NEGCLASSES", "NOMODEL", "BADQUANT", "HUGE", "OTHERDATA"):
        flag = flag.replace(placeholder, paths[placeholder].name)
    before, inputs = _snapshot(tmp_path), {p: p.read_bytes() for p in (files["CKPT"], files["QCKPT"])}
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert flag in err and needle in err, err
    assert _snapshot(tmp_path) == before                       # nothing created, changed or re-moded
    assert {p: p.read_bytes() for p in inputs} == inputs
    assert seconds < 3, seconds                                # refused before data loading / training


def test_json_mode_reports_errors_as_json(files, capsys):
    code = main(["eval", "--checkpoint", str(files["CKPT"]), "--data", "digits", "--eval-limit", "5", "--json",
                 "--min-top1", "101"])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert code == 1 and "check failed" in err
    assert json.loads(lines[0])["command"] == "eval" and "below 101" in json.loads(lines[-1])["error"]


def test_min_top1_gates(files, capsys):
    assert main(["eval", "--checkpoint", str(files["CKPT"]), "--data", "digits", "--min-top1", "0"]) == 0
    assert main(["eval", "--checkpoint", str(files["CKPT"]), "--data", "digits", "--min-top1", "100.1"]) == 1


def test_verify_failure_exits_nonzero_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    """ONNX Runtime and the simulation are made to disagree (the simulation's weights scaled after quantization,
    which the checkpoint check cannot see): --verify exits 1 and the existing --onnx file is kept."""
    target = tmp_path / "m.onnx"
    target.write_bytes(b"older export")
    assert main(["export", "--checkpoint", str(files["QCKPT"]), "--onnx", str(target), "--data", "digits",
                 "--verify", "--overwrite", "--json"]) == 0
    capsys.readouterr()
    exported = target.read_bytes()
    real = repq.export.verify_against_simulation
    monkeypatch.setattr(repq.export, "verify_against_simulation",
                        lambda *a, **k: {**real(*a, **k), "argmax_agreement": 50.0})
    code = main(["export", "--checkpoint", str(files["QCKPT"]), "--onnx", str(target), "--data", "digits",
                 "--verify", "--overwrite"])
    out, err = capsys.readouterr()
    assert code == 1 and "--verify failed" in err and "was not written" in err
    assert target.read_bytes() == exported and not list(tmp_path.glob(".*partial*"))


def test_overwrite_replaces_and_models_lists(files, tmp_path, capsys):
    target = tmp_path / "again.onnx"
    args = ["export", "--checkpoint", str(files["QCKPT"]), "--onnx", str(target), "--data", "digits"]
    assert main(args) == 0 and target.exists()
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    import onnx
    props = {p.key: json.loads(p.value) for p in onnx.load(str(target)).metadata_props}
    assert props["repq_data"]["name"] == "digits" and props["repq_data"]["input_size"] == [1, 8, 8]
    assert main(["models", "--json"]) == 0
    models = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["models"]
    assert {"repvgg_b2g2", "repvgg_d2se", "mobileone_s0"} <= {m["name"] for m in models}
    assert main(["--version"]) == 0 and repq.__version__ in capsys.readouterr().out


def test_checkpoints_record_their_data_and_mismatch_can_be_allowed(files, capsys):
    meta = read_checkpoint(files["CKPT"])["data_meta"]
    assert meta["name"] == "digits" and meta["input_size"] == [1, 8, 8] and len(meta["classes"]) == 10
    assert read_checkpoint(files["QCKPT"])["data_meta"] == meta
    other = files["CKPT"].parent / "otherdata.pt"
    if not other.exists():
        _edited(other.parent, files["CKPT"], lambda p: p["data_meta"].update(name="fashion-mnist"), other.name)
    assert main(["eval", "--checkpoint", str(other), "--data", "digits", "--allow-data-mismatch",
                 "--eval-limit", "10"]) == 0


def test_loader_refuses_a_huge_config_without_allocating(files):
    path = files["CKPT"].parent / "huge2.pt"
    _edited(path.parent, files["CKPT"], lambda p: p["model"].update(width_scale=400.0), path.name)
    start = time.perf_counter()
    with pytest.raises(repq.RepqError, match="does not fit"):
        repq.load_checkpoint(path)
    assert time.perf_counter() - start < 2


def test_tiny_model_helper_still_saves(tmp_path):
    repq.save_checkpoint(tmp_path / "t.pt", tiny())
    assert repq.load_checkpoint(tmp_path / "t.pt")[1]["kind"] == "train"


def test_ctrl_c_during_compare_keeps_the_finished_rows(files, capsys, monkeypatch):
    real, calls = repq.quantize, []

    def interrupted_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(repq, "quantize", interrupted_on_second)
    code = main(["ptq", "--checkpoint", str(files["CKPT"]), "--data", "digits", "--calib", "8", "--compare",
                 "--weight", "minmax,cfws", "--activation", "minmax", "--json"])
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[0])
    assert code == 130 and "interrupted after 1 of 2 runs" in err
    assert result["interrupted"] and [r["weight"] for r in result["results"]] == ["minmax"]


def test_eval_in_onnx_runtime_beside_the_simulation(files, capsys):
    code = main(["eval", "--checkpoint", str(files["QCKPT"]), "--data", "digits", "--runtime", "ort", "--json"])
    rows = json.loads(capsys.readouterr().out)["results"]
    assert code == 0 and set(rows) == {"quantized", "quantized in ONNX Runtime"}
    assert abs(rows["quantized"]["top1"] - rows["quantized in ONNX Runtime"]["top1"]) <= 0.6   # <= 2 of 359 images
    assert all(r["images_per_s"] > 0 and r["n"] == 359 for r in rows.values())
    code = main(["eval", "--checkpoint", str(files["CKPT"]), "--data", "digits", "--runtime", "ort", "--json"])
    rows = json.loads(capsys.readouterr().out)["results"]
    assert code == 0 and rows["fused"]["top1"] == pytest.approx(rows["fused in ONNX Runtime"]["top1"], abs=0.3)


def test_explicit_cpu_device_runs(files, capsys):
    assert main(["eval", "--checkpoint", str(files["QCKPT"]), "--data", "digits", "--device", "cpu",
                 "--eval-limit", "20"]) == 0

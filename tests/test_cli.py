"""The command line: --help everywhere, --json output, one-line errors, and the end-to-end train -> ptq -> eval."""
import json
import subprocess
import sys

import pytest
import torch

import repq
from repq.cli import build_parser, main
from tests.conftest import tiny

COMMANDS = ["train", "ptq", "eval", "export", "analyze", "import", "demo"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    assert main([command, "--help"] if command else ["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: repq" in out and ("(default:" in out or command is None)


def test_entry_point_runs_as_a_program():
    result = subprocess.run([sys.executable, "-m", "repq.cli", "ptq", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--activation" in result.stdout


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "fp.pt"
    code = main(["train", "--data", "digits", "--epochs", "2", "--max-steps", "4", "--batch-size", "32",
                 "--small-input", "--width-scale", "0.125", "--out", str(path), "--json"])
    assert code == 0 and path.exists()
    return path


def test_train_eval_ptq_json(trained_checkpoint, tmp_path, capsys):
    code, out, _ = run(capsys, "eval", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--json")
    result = json.loads(out)
    assert code == 0 and set(result["results"]) == {"train", "fused"}
    assert result["results"]["train"]["top1"] == pytest.approx(result["results"]["fused"]["top1"])

    q_path = tmp_path / "int8.pt"
    code, out, _ = run(capsys, "ptq", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--weight", "cfws",
                       "--activation", "improved-kl", "--calib", "16", "--unsigned-activations", "--quantize-pool",
                       "--out", str(q_path), "--json")
    result = json.loads(out)
    assert code == 0 and result["results"][0]["activation"] == "improved_kl" and q_path.exists()
    quant = repq.checkpoint.read_checkpoint(q_path)["quant"]
    assert quant["ptq"]["quantize_pool"] and quant["ptq"]["unsigned_activations"] and list(quant["pools"]) == ["gap"]
    code, out, _ = run(capsys, "eval", "--checkpoint", str(q_path), "--data", "digits", "--json")
    assert json.loads(out)["results"]["quantized"]["top1"] == pytest.approx(result["results"][0]["top1"])

    code, out, _ = run(capsys, "ptq", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--compare",
                       "--weight", "minmax,cfws", "--activation", "minmax", "--calib", "8")
    assert code == 0 and "cfws" in out and "minmax" in out and "FP top-1" in out


def test_ptq_edge_bits(trained_checkpoint, capsys):
    code, out, _ = run(capsys, "ptq", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--calib", "8",
                       "--w-bits", "4", "--a-bits", "4", "--activation", "percentile")   # 8 by default
    assert code == 0 and "W4A4, edges 8" in out and "at 8 bits (--edge-bits): stage0.rbr_reparam, linear" in out
    code, out, _ = run(capsys, "ptq", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--calib", "8",
                       "--w-bits", "4", "--a-bits", "4", "--edge-bits", "0", "--activation", "percentile")
    assert code == 0 and "W4A4" in out and "edges 8" not in out and "(--edge-bits)" not in out


def test_default_ptq_reports_the_calibrator_of_every_layer(trained_checkpoint, capsys):
    code, out, _ = run(capsys, "ptq", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--calib", "16")
    assert code == 0 and "per-layer activation calibrator" in out and "guard:" in out
    assert "16 calibration images" in out and "auto (float inputs" in out
    code, out, _ = run(capsys, "ptq", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--calib", "5000",
                       "--json")
    result = json.loads(out)["results"][0]
    assert result["activation"] == "auto" and result["weight"] == "cfws"
    train_size = len(repq.load_dataset("digits", "train"))
    assert result["calibration"]["images"] == train_size and result["calibration"]["seed"] == 0   # what was used
    layers = {r["layer"]: r for r in result["layers"]}
    first = layers["stage0.rbr_reparam"]                                               # the network input:
    assert first["calibrator"] == "affine" and not first["signed"] and 0 < first["zero_point"] < 255   # affine
    from repq.quant.selection import CANDIDATES
    assert all(r["calibrator"] in CANDIDATES for name, r in layers.items() if name != "stage0.rbr_reparam")
    assert set(result["guard"]) >= {"baseline_error", "final_error", "fallbacks"}
    assert not layers["stage1.0.rbr_reparam"]["signed"]                  # post-ReLU: unsigned codes by default
    code, out, _ = run(capsys, "ptq", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--calib", "16",
                       "--signed-activations", "--json")
    assert code == 0 and all(r["signed"] for r in json.loads(out)["results"][0]["layers"])   # the input too
    assert json.loads(out)["results"][0]["layers"][0]["calibrator"] == "minmax"              # P1's max-abs


def test_ptq_reports_activation_equalization_and_its_switch(trained_checkpoint, capsys):
    code, out, _ = run(capsys, "ptq", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--calib", "16")
    model = repq.load_checkpoint(trained_checkpoint)[0]
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in repq.reparameterize(model).modules())
    assert code == 0 and f"activation equalization: {convs} conv pair(s)" in out   # a chain: every conv feeds one
    code, out, _ = run(capsys, "ptq", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--calib", "16",
                       "--no-equalize", "--json")
    result = json.loads(out)["results"][0]
    assert code == 0 and result["equalization"]["pairs"] == 0 and "equalize=False" in result["equalization"]["text"]


@pytest.mark.parametrize("argv,needle", [
    (["eval", "--checkpoint", "/nonexistent/x.pt", "--data", "digits"], "not found"),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--w-bits", "1"], "--w-bits: w_bits must be between"),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--activation", "entropy"], "--activation: unknown"),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--input-activation", "max"], "--input-activation: unknown"),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--calib", "0"], "--calib:"),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--out", "CKPT"], "never overwritten"),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--weight", "minmax,cfws"], "--compare"),
    (["ptq", "--checkpoint", "CKPT", "--data", "svhn"], "unknown data"),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--weight", "gptq"], "unknown weight method"),
    (["ptq", "--checkpoint", "CKPT", "--data", "digits", "--w-bits", "eight"], "take integers"),
    (["train", "--data", "digits", "--model", "resnet50", "--out", "OUT"], "unknown model"),
])
def test_user_errors_are_one_line(argv, needle, trained_checkpoint, tmp_path, capsys):
    argv = [str(trained_checkpoint) if a == "CKPT" else str(tmp_path / "o.pt") if a == "OUT" else a for a in argv]
    before = trained_checkpoint.read_bytes()
    code, out, err = run(capsys, *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert trained_checkpoint.read_bytes() == before


def test_class_mismatch_between_checkpoint_and_data(tmp_path, capsys):
    repq.save_checkpoint(tmp_path / "seven.pt", tiny(num_classes=7))
    code, _, err = run(capsys, "eval", "--checkpoint", str(tmp_path / "seven.pt"), "--data", "digits")
    assert code == 2 and "7 classes" in err and "10 classes" in err


def test_parser_lists_every_command():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(COMMANDS) <= set(sub.choices)


@pytest.mark.slow
def test_torchrun_two_processes_write_one_checkpoint(tmp_path):
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m",
           "repq.cli", "train", "--data", "digits", "--epochs", "1", "--max-steps", "3", "--batch-size", "16",
           "--small-input", "--width-scale", "0.125", "--out", str(out), "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.exists() and len(list(tmp_path.glob("*.pt"))) == 1
    payload = repq.checkpoint.read_checkpoint(out)
    assert len(payload["train_state"]["history"]["loss"]) == 3


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    """The demo on the bundled digits (what a machine without Fashion-MNIST gets). Whether its training kills
    channels, and so whether naive INT8 collapses, depends on the CPU's float rounding: with seed 3 naive INT8 fell
    to 23.96 on the Intel machine of 2026-12 and held at 97.21 (FP 96.94) on an AMD EPYC. So the test checks that
    the demo tells the story its own numbers show: the collapse where there is one, else the outliers at 4-bit
    weights (per-channel min-max W4A8 89.42 against repq's default 96.38 on that EPYC)."""
    code, out, _ = run(capsys, "demo", "--data", "digits", "--out", str(tmp_path / "demo"), "--seed", "3", "--json")
    result = json.loads(out)
    assert code == 0 and len(result["results"]) == 6 and result["data"] == "digits"
    assert result["train"] == {"epochs": 40, "lr": 0.2, "seed": 3}
    fp = result["fused"]["top1"]
    assert fp > 90 and result["repq_default_int8"] > fp - 2
    story = (tmp_path / "demo" / "results.md").read_text()
    if result["naive_int8"] < fp - 20:
        assert "naive INT8 fails on this model" in story
    else:
        baseline4, default4 = result["results"][4], result["results"][5]
        assert (baseline4["bits"], default4["bits"]) == ("W4A8", "W4A8")
        assert "naive INT8 holds on this model" in story and default4["top1"] > baseline4["top1"] + 3
    pngs = [f for f in result["files"] if f.endswith(".png")]
    assert len(pngs) >= 6 and any(f.endswith("analysis/report.md") for f in result["files"])
    for png in pngs:
        with open(png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_on_fashion_mnist_shows_the_failure_and_the_cure(tmp_path, capsys):
    """The promise of `make demo` (issue 16): naive per-tensor INT8 far below FP, repq's default near it, and the
    analysis naming the cause (an identity branch reading a channel that was constant in training). ~1 minute."""
    from repq.data.datasets import fashion_mnist_dir
    try:
        fashion_mnist_dir()
    except repq.RepqError:
        pytest.skip("Fashion-MNIST is not installed (as root: make data)")
    code, out, _ = run(capsys, "demo", "--out", str(tmp_path / "demo"), "--json")
    result = json.loads(out)
    assert code == 0 and result["data"] == "fashion-mnist"
    fp = result["fused"]["top1"]
    assert fp > 80
    assert result["naive_int8"] < fp - 20
    assert result["repq_default_int8"] > fp - 1
    assert any("were constant in training" in line for line in result["findings"])


def test_ptq_two_branch_reports_its_check(trained_checkpoint, capsys):
    code, out, _ = run(capsys, "ptq", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--calib", "8",
                       "--cfws-deploy", "two-branch", "--json")
    assert code == 0
    result = json.loads(out)["results"][0]
    check = result["two_branch_check"]
    assert check["worse_than_baseline"] == (check["error"] > check["baseline_error"]) and check["baseline_error"] > 0
    kept = [r["layer"] for r in result["layers"] if r["cfws_form"] == "single_conv"]
    code, out, _ = run(capsys, "ptq", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--calib", "8",
                       "--cfws-deploy", "two-branch")
    assert code == 0 and "two_branch CFWS check: network output error" in out
    summary = (f"two_branch CFWS: {check['two_branch_layers']} layer(s) as two branches, "
               f"{len(check['one_conv_layers'])} as one min-max conv")
    assert summary in out and all(name in out for name in check["one_conv_layers"])
    assert sorted(kept) == check["one_conv_layers"] and "CFWS deployed as" in out
    code, out, _ = run(capsys, "ptq", "--checkpoint", str(trained_checkpoint), "--data", "digits", "--calib", "8",
                       "--cfws-deploy", "two-branch", "--no-one-conv-fallback", "--json")
    check = json.loads(out)["results"][0]["two_branch_check"]
    assert code == 0 and check["one_conv_layers"] == [] and check["two_branch_layers"] > 0

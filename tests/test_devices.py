"""Devices: `--device auto` picks the CPU where there is no CUDA; on a machine with a GPU, train / qat (with AMP),
ptq and eval run on it and DDP runs with nccl under torchrun. CPU-only machines skip the GPU tests with the
reason."""
import json
import os
import subprocess
import sys

import pytest
import torch

import repq
from repq.cli import main
from repq.cli_checks import resolve_device

NO_GPU = "needs a CUDA GPU (this machine has none): the CUDA paths (--device cuda, --amp, DDP with nccl) run on GPU machines only"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)


def test_auto_is_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(repq.RepqError, match="--device cuda: no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(repq.RepqError, match="--amp bf16 needs a CUDA device"):
        resolve_device("auto", amp="bf16")


def _json(capsys, *argv):
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_qat_ptq_eval_on_cuda(tmp_path, capsys, amp):
    fp, q = str(tmp_path / "fp.pt"), str(tmp_path / "q.pt")
    train = _json(capsys, "train", "--model", "repvgg_a0", "--width-scale", "0.25", "--small-input", "--data",
                  "digits", "--epochs", "3", "--device", "cuda", "--amp", amp, "--out", fp)
    assert train["fused"]["top1"] > 50 and train["epochs"][-1]["images_per_s"] > 0
    qat = _json(capsys, "qat", "--checkpoint", fp, "--data", "digits", "--w-bits", "4", "--a-bits", "4",
                "--epochs", "1", "--device", "cuda", "--amp", amp, "--out", q)
    assert qat["qat"]["top1"] > 20
    ptq = _json(capsys, "ptq", "--checkpoint", fp, "--data", "digits", "--device", "cuda")
    cpu = _json(capsys, "ptq", "--checkpoint", fp, "--data", "digits", "--device", "cpu")
    assert abs(ptq["results"][0]["top1"] - cpu["results"][0]["top1"]) < 1.5   # same recipe, other kernels
    ev = _json(capsys, "eval", "--checkpoint", q, "--data", "digits", "--device", "cuda")
    assert ev["results"]["quantized"]["top1"] == pytest.approx(qat["qat"]["top1"], abs=0.5)


@gpu
def test_ddp_with_nccl_under_torchrun(tmp_path):
    procs = min(torch.cuda.device_count(), 2)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "-m",
                          "repq.cli", "train", "--model", "repvgg_a0", "--width-scale", "0.25", "--small-input",
                          "--data", "digits", "--epochs", "2", "--device", "cuda", "--out", str(tmp_path / "ddp.pt"),
                          "--json"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert repq.load_checkpoint(tmp_path / "ddp.pt")[1]["kind"] == "train"

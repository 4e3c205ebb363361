"""Checkpoints (safe, atomic, architecture-checked) and deterministic, resumable training."""
import os
import pickle

import pytest
import torch

import repq
from tests.conftest import randomize_bn, tiny


def test_roundtrip_of_train_and_fused_models(tmp_path):
    model = randomize_bn(tiny())
    x = torch.randn(2, 1, 16, 16)
    repq.save_checkpoint(tmp_path / "m.pt", model)
    loaded, payload = repq.load_checkpoint(tmp_path / "m.pt")
    assert payload["kind"] == "train" and torch.equal(loaded(x), model(x))
    fused = repq.reparameterize(model)
    repq.save_checkpoint(tmp_path / "f.pt", fused)
    loaded, payload = repq.load_checkpoint(tmp_path / "f.pt")
    assert payload["kind"] == "fused" and torch.equal(loaded(x), fused(x))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_wrong_architecture_or_classes_one_line_error(tmp_path):
    repq.save_checkpoint(tmp_path / "a0.pt", tiny())
    for other, words in ((tiny("repvgg_a1"), "repvgg_a1"), (tiny(num_classes=7), "num_classes=7")):
        with pytest.raises(repq.RepqError) as err:
            repq.load_into(other, tmp_path / "a0.pt")
        message = str(err.value)
        assert "\n" not in message and "repvgg_a0" in message and words in message


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loading_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"format": "repq-checkpoint", "payload": Evil()}, fh)
    with pytest.raises(repq.RepqError, match="refusing to load"):
        repq.load_checkpoint(path)
    assert not marker.exists()


def test_foreign_missing_and_truncated_files(tmp_path):
    with pytest.raises(repq.RepqError, match="not found"):
        repq.load_checkpoint(tmp_path / "missing.pt")
    torch.save(tiny().state_dict(), tmp_path / "raw.pt")
    with pytest.raises(repq.RepqError, match="not a repq checkpoint"):
        repq.load_checkpoint(tmp_path / "raw.pt")
    repq.save_checkpoint(tmp_path / "ok.pt", tiny())
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(repq.RepqError, match="not a readable checkpoint"):
        repq.load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("x\n")
    with pytest.raises(repq.RepqError, match="not a readable checkpoint"):
        repq.load_checkpoint(tmp_path / "text.pt")


def _short_run(ds, out=None, resume=None, epochs=2):
    torch.manual_seed(0)  # the initialization is part of the run
    model = tiny()
    cfg = repq.TrainConfig(epochs=epochs, batch_size=32, lr=0.05, seed=7, max_steps_per_epoch=5)
    return model, repq.train(model, ds, cfg, out=out, resume=resume, progress=False)


def test_same_seed_same_loss_curve(digits):
    train_ds, _ = digits
    _, h1 = _short_run(train_ds)
    _, h2 = _short_run(train_ds)
    assert len(h1["loss"]) == 10 and h1["loss"] == h2["loss"]


def test_resume_continues_the_same_run(digits, tmp_path, monkeypatch):
    train_ds, _ = digits
    import shutil

    import repq.training as train_module
    real_save = train_module.save_checkpoint

    def save_and_keep_each_epoch(path, model, **extra):  # keep the epoch-1 file of the 2-epoch run
        real_save(path, model, **extra)
        shutil.copy(path, f"{path}.epoch{extra['train_state']['epoch']}")
    monkeypatch.setattr(train_module, "save_checkpoint", save_and_keep_each_epoch)
    full_model, full = _short_run(train_ds, out=str(tmp_path / "run.pt"), epochs=2)
    monkeypatch.undo()
    torch.manual_seed(123)  # a different initialization: resuming must overwrite it
    model = tiny()
    cfg = repq.TrainConfig(epochs=2, batch_size=32, lr=0.05, seed=7, max_steps_per_epoch=5)
    history = repq.train(model, train_ds, cfg, resume=str(tmp_path / "run.pt.epoch1"), progress=False)
    assert history["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(model.state_dict().values(),
                                                                full_model.state_dict().values()))


def test_resume_into_another_architecture_is_one_line(digits, tmp_path, capsys):
    from repq.cli import main
    train_ds, _ = digits
    _short_run(train_ds, out=str(tmp_path / "run.pt"), epochs=1)
    code = main(["train", "--data", "digits", "--model", "repvgg_a1", "--resume", str(tmp_path / "run.pt"),
                 "--out", str(tmp_path / "new.pt"), "--epochs", "2", "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "repvgg_a0" in err and "repvgg_a1" in err and len(err.strip().splitlines()) == 1


def test_zero_epochs_is_refused(digits):
    with pytest.raises(repq.RepqError, match="at least 1"):
        repq.train(tiny(), digits[0], repq.TrainConfig(epochs=0), progress=False)


def test_class_mismatch_is_refused(digits):
    train_ds, _ = digits
    with pytest.raises(repq.RepqError, match="10 classes but the model has 7"):
        repq.train(tiny(num_classes=7), train_ds, repq.TrainConfig(epochs=1), progress=False)

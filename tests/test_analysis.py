"""Diagnostics: numbers against hand computations on a tiny model with a planted identity-BN outlier."""
import json
import math

import pytest
import torch

import repq
from repq.analysis import analyze, branch_contributions, center_surround_stats, sqnr_db
from repq.analysis.report import quantizer_sqnr
from tests.conftest import randomize_bn, tiny

PLANTED = "stage3.1"


@pytest.fixture(scope="module")
def planted():
    """A tiny RepVGG whose block stage3.1 has one identity-BN channel with gamma 500 and running var 0.01."""
    model = randomize_bn(tiny(), seed=11)
    bn = model.get_submodule(PLANTED).rbr_identity
    with torch.no_grad():
        bn.weight[2] = 500.0
        bn.running_var[2] = 0.01
    return model


def test_branch_contribution_is_the_folded_bn_scale(planted):
    contrib = {c.layer: c for c in branch_contributions(planted)}[f"{PLANTED}.rbr_reparam"]
    bn = planted.get_submodule(PLANTED).rbr_identity
    assert contrib.identity == pytest.approx(500.0 / math.sqrt(0.01 + bn.eps), rel=1e-6)
    assert contrib.dominant == "identity"
    block = planted.get_submodule(PLANTED)
    t1 = block.rbr_1x1.bn.weight / torch.sqrt(block.rbr_1x1.bn.running_var + block.rbr_1x1.bn.eps)
    folded_1x1 = (block.rbr_1x1.conv.weight * t1[:, None, None, None]).detach()
    assert contrib.one_by_one == pytest.approx(float(folded_1x1.abs().max()), rel=1e-5)


def test_constant_input_channels_are_named_as_the_cause():
    """A channel the previous ReLU never lets through: identity BN running var ~0, so gamma / sqrt(eps) ~ 316 gamma."""
    from repq.analysis.report import diagnose
    model = randomize_bn(tiny(), seed=12)
    bn = model.get_submodule(PLANTED).rbr_identity
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.running_var.fill_(1.0)
        bn.running_var[1] = 2e-10   # below eps: constant input
        bn.running_var[3] = 2e-5    # small but above eps: not counted
    contrib = {c.layer: c for c in branch_contributions(model)}[f"{PLANTED}.rbr_reparam"]
    assert contrib.constant_inputs == 1
    assert contrib.identity == pytest.approx(1.0 / math.sqrt(2e-10 + bn.eps), rel=1e-6)
    lines = diagnose(center_surround_stats(repq.reparameterize(model)), [contrib])
    assert lines and lines[0].startswith(f"{PLANTED}.rbr_reparam") and "1 input channel(s) were constant" in lines[0]


def test_mobileone_scale_branch_reading_a_dead_channel_is_named():
    """The zoo's MobileOne collapse: a depthwise 1x1 scale branch whose BN saw running var 2e-10."""
    from repq.analysis.report import diagnose
    model = randomize_bn(repq.create_model("mobileone_s0", num_classes=10, in_chans=1, width_scale=0.25), seed=13)
    from repq.models.mobileone import MobileOneBlock
    name, block = next((n, m) for n, m in model.named_modules()
                       if isinstance(m, MobileOneBlock) and m.rbr_scale is not None and m.rbr_conv[0].conv.groups > 1)
    bn = block.rbr_scale.bn
    with torch.no_grad():
        bn.weight[2], bn.running_var[2] = 1.0, 2e-10
        block.rbr_scale.conv.weight[2] = 0.76
    contrib = {c.layer: c for c in branch_contributions(model)}[f"{name}.conv"]
    assert contrib.constant_inputs >= 1 and contrib.dominant == "1x1"
    assert contrib.one_by_one == pytest.approx(0.76 / math.sqrt(2e-10 + bn.eps), rel=1e-5)
    with torch.no_grad():   # the fused center tap, summed by hand from the branches' BN statistics
        expected = 0.76 * 1.0 / math.sqrt(2e-10 + bn.eps) + sum(
            float(b.conv.weight[2, 0, 1, 1] * b.bn.weight[2] / torch.sqrt(b.bn.running_var[2] + b.bn.eps))
            for b in block.rbr_conv)
        if block.rbr_skip is not None:
            skip = block.rbr_skip
            expected += float(skip.weight[2] / torch.sqrt(skip.running_var[2] + skip.eps))
    fused = repq.reparameterize(model)
    assert dict(fused.named_modules())[f"{name}.conv"].weight[2, 0, 1, 1].item() == pytest.approx(expected, rel=1e-5)
    lines = diagnose(center_surround_stats(fused), [contrib])
    assert any(line.startswith(f"{name}.conv") and "were constant in training" in line for line in lines)


def test_center_surround_stats_by_hand(planted):
    fused = repq.reparameterize(planted)
    stats = {s.name: s for s in center_surround_stats(fused)}[f"{PLANTED}.rbr_reparam"]
    w = fused.get_submodule(f"{PLANTED}.rbr_reparam").weight.detach()
    surround = torch.cat([w[:, :, 0, :].flatten(), w[:, :, 2, :].flatten(), w[:, :, 1, 0].flatten(),
                          w[:, :, 1, 2].flatten()])
    assert stats.center_absmax == pytest.approx(float(w[:, :, 1, 1].abs().max()))
    assert stats.surround_absmax == pytest.approx(float(surround.abs().max()))
    x = w.double().flatten()
    kurt = float(((x - x.mean()) ** 4).mean() / ((x - x.mean()) ** 2).mean() ** 2 - 3)
    assert stats.kurtosis == pytest.approx(kurt, rel=1e-6)
    assert stats.ratio > 100


def test_sqnr_definition_and_cfws_advantage(planted):
    ref = torch.tensor([3.0, 4.0])
    assert sqnr_db(ref, torch.tensor([3.0, 3.0])) == pytest.approx(10 * math.log10(25 / 1))
    assert sqnr_db(ref, ref) == math.inf
    fused = repq.reparameterize(planted)
    table = quantizer_sqnr(fused, torch.randn(4, 1, 16, 16), bits=8)[f"{PLANTED}.rbr_reparam"]
    assert table["cfws"]["weight_db"] > table["minmax/channel"]["weight_db"] > table["minmax/tensor"]["weight_db"]


def test_analyze_flags_the_planted_layer_and_writes_the_report(planted, tmp_path):
    images = torch.randn(8, 1, 16, 16)
    data = (torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,)))
    result = analyze(planted, images, tmp_path / "report", eval_data=data, alphas=(0.5, 1.0))
    assert result["findings"][0].startswith(f"{PLANTED}.rbr_reparam") and "identity" in result["findings"][0]
    assert set(result["clipping"][f"{PLANTED}.rbr_reparam"]) == {"0.5", "1.0"}
    for f in result["files"]:
        if f.endswith(".png"):
            with open(f, "rb") as fh:
                assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Findings" in report and "clipping.png" in report and f"{PLANTED}.rbr_reparam" in report
    json.dumps(result)  # the CLI prints it with --json


def test_cli_analyze(tmp_path, capsys):
    from repq.cli import main
    repq.save_checkpoint(tmp_path / "m.pt", randomize_bn(tiny()))
    assert main(["analyze", "--checkpoint", str(tmp_path / "m.pt"), "--data", "digits", "--out",
                 str(tmp_path / "r"), "--eval-limit", "50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["command"] == "analyze" and (tmp_path / "r" / "report.md").exists()

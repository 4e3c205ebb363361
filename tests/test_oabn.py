"""OABN (methods.md section 4): equals BatchNorm2d when its bound is inactive, never lets the folded scale past the
bound, and the fused model equals the trained one."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import repq
from repq.models.oabn import OutlierAwareBatchNorm2d
from repq.reparam.fold import bn_scale
from tests.conftest import tiny


def _pair(rule: str, tau: float):
    torch.manual_seed(0)
    bn, oabn = nn.BatchNorm2d(6), OutlierAwareBatchNorm2d(6, rule=rule, tau=tau)
    with torch.no_grad():
        gamma, beta = torch.randn(6), torch.randn(6)
        for m in (bn, oabn):
            m.weight.copy_(gamma)
            m.bias.copy_(beta)
    return bn, oabn


@pytest.mark.parametrize("rule", ["fixed", "variance_floor"])
def test_inactive_bound_equals_batchnorm_in_train_and_eval(rule):
    bn, oabn = _pair(rule, tau=1e6)
    x = torch.randn(8, 6, 5, 5) * 3 + 1
    for _ in range(3):  # training mode: batch statistics, and the same running-statistic updates
        torch.testing.assert_close(oabn.train()(x), bn.train()(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(oabn.running_var, bn.running_var)
    torch.testing.assert_close(oabn.running_mean, bn.running_mean)
    torch.testing.assert_close(oabn.eval()(x), bn.eval()(x), atol=1e-5, rtol=1e-5)
    # Gradients too: the clip is the only difference, and it is inactive.
    xb = x.clone().requires_grad_(True)
    xo = x.clone().requires_grad_(True)
    bn.train()(xb).square().sum().backward()
    oabn.train()(xo).square().sum().backward()
    torch.testing.assert_close(xo.grad, xb.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(oabn.weight.grad, bn.weight.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rule", ["fixed", "variance_floor"])
def test_active_bound_limits_the_folded_scale_and_the_output(rule):
    bn, oabn = _pair(rule, tau=0.3)
    x = torch.randn(16, 6, 4, 4) * 0.1  # small variance: gamma / sqrt(var) far above 0.3
    y = oabn.train()(x)
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    t = torch.clamp(oabn.weight / torch.sqrt(var + oabn.eps), -0.3, 0.3)  # the definition, computed here
    expected = t.reshape(1, -1, 1, 1) * (x - mean.reshape(1, -1, 1, 1)) + oabn.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert float(oabn.folded_scale().detach().abs().max()) <= 0.3 + 1e-6
    assert float(bn_scale(bn).detach().abs().max()) > 0.3  # the plain BN would have exceeded it


def test_variance_floor_keeps_a_gradient_to_gamma_where_clamp_gives_none():
    _, fixed = _pair("fixed", tau=0.3)
    _, floor = _pair("variance_floor", tau=0.3)
    x = torch.randn(16, 6, 4, 4) * 0.1
    for m in (fixed, floor):
        m.train()(x).square().sum().backward()
    assert float(fixed.weight.grad.abs().max()) == 0.0  # every channel clipped: no gradient through the clamp
    assert float(floor.weight.grad.abs().min()) > 0.0


@pytest.mark.parametrize("options", [dict(branches="identity", rule="fixed", tau=0.5),
                                     dict(branches="identity+1x1", rule="relative", k=1.5),
                                     dict(branches="all", rule="variance_floor", tau=0.8)])
def test_trained_oabn_model_fuses_exactly_and_respects_the_bound(options, digits):
    train_ds, test_ds = digits
    torch.manual_seed(0)
    model = tiny(width_scale=0.25, oabn=options)
    assert any(isinstance(m, OutlierAwareBatchNorm2d) for m in model.modules())
    repq.train(model, train_ds, repq.TrainConfig(epochs=1, batch_size=32, lr=0.05, max_steps_per_epoch=15),
               progress=False)
    x = next(iter(test_ds.batches(64)))[0]
    for bn in model.modules():  # one more training-mode forward that leaves the running statistics as they are
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = 0.0
    with torch.no_grad():
        model.train()(x)
    model.eval()
    for block in model.modules():
        if not isinstance(block, repq.models.blocks.RepVGGBlock):
            continue
        dense = block.rbr_dense.conv.weight * bn_scale(block.rbr_dense.bn).reshape(-1, 1, 1, 1)
        for bn in (block.rbr_identity, block.rbr_1x1.bn, block.rbr_dense.bn):
            if not isinstance(bn, OutlierAwareBatchNorm2d):
                continue
            scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).clamp(-bn.bound, bn.bound)
            torch.testing.assert_close(bn.folded_scale(), scale)
            assert bool((bn.folded_scale().abs() <= bn.bound + 1e-6).all())
            if options["rule"] == "relative" and bn is block.rbr_identity:
                # Set by the training-mode forward: k times the largest folded 3x3 tap of each output channel.
                torch.testing.assert_close(bn.bound, options["k"] * dense.abs().flatten(1).amax(1),
                                           atol=1e-6, rtol=1e-5)
            elif options["rule"] != "relative":
                assert bool((bn.bound == options["tau"]).all())
    with torch.no_grad():
        ref = model(x)
        assert float((repq.reparameterize(model)(x) - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))
        # In float64 the difference is rounding only: the merge used the clipped scales.
        model, x = model.double(), x.double()
        assert float((repq.reparameterize(model)(x) - model(x)).abs().max()) < 1e-9


def test_oabn_in_create_model_and_checkpoint(tmp_path):
    model = tiny(oabn=True)
    assert isinstance(model.stage1[1].rbr_identity, OutlierAwareBatchNorm2d)
    assert not isinstance(model.stage1[1].rbr_1x1.bn, OutlierAwareBatchNorm2d)  # identity only by default
    repq.save_checkpoint(tmp_path / "m.pt", model)
    loaded, payload = repq.load_checkpoint(tmp_path / "m.pt")
    assert payload["model"]["oabn"] is True and isinstance(loaded.stage1[1].rbr_identity, OutlierAwareBatchNorm2d)
    fused = repq.reparameterize(model)
    repq.save_checkpoint(tmp_path / "f.pt", fused)
    assert repq.load_checkpoint(tmp_path / "f.pt")[1]["kind"] == "fused"


@pytest.mark.parametrize("options, message", [(dict(rule="median"), "unknown OABN rule"),
                                              (dict(branches="all", rule="relative"), "relative OABN rule"),
                                              (dict(tau=-1), "positive"), (dict(taux=1), "unknown OABN option")])
def test_bad_oabn_options_are_one_line_errors(options, message):
    with pytest.raises(repq.RepqError, match=message):
        tiny(oabn=options)


def test_unknown_model_argument_is_a_one_line_error():
    with pytest.raises(repq.RepqError, match="does not take"):
        tiny(oabn_tau=2.0)

"""Per-channel activation equalization (repq.quant.equalization): which pairs, which scales, the function kept, the
gain it buys, and the guard that drops it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repq
from repq.quant import equalization
from repq.quant.equalization import _ChannelStats, channel_scales, equalize_activations, find_pairs


class Branchy(nn.Module):
    """Every case find_pairs must tell apart: a plain conv -> ReLU -> conv chain, a residual add, a concat, a SiLU,
    a max-pool on the way, one tensor read by two convs, a flatten of a spatial map into a linear, and the classic
    global-pool head."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)              # c0 -> relu -> maxpool -> c1: a pair
        self.c2 = nn.Conv2d(8, 8, 1)                         # c1 -> relu -> (c2, c3): a pair with two consumers
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(8, 8, 1)                         # c2 feeds an add: no pair
        self.c5 = nn.Conv2d(16, 8, 1)                        # c3 feeds a cat: no pair
        self.c6 = nn.Conv2d(8, 8, 3, padding=1, groups=8)    # c5 -> silu -> c6: not homogeneous, no pair
        self.c7 = nn.Conv2d(8, 4, 1)                         # c6 -> relu -> c7: a pair (depthwise producer)
        self.fc_spatial = nn.Linear(4 * 2 * 2, 6)            # c7 -> relu -> flatten of 2x2 maps: no pair
        self.c8 = nn.Conv2d(4, 5, 1)
        self.fc = nn.Linear(5, 3)                            # c8 -> relu -> mean over space -> fc: a pair

    def forward(self, x):
        a = F.max_pool2d(torch.relu(self.c0(x)), 2)
        b = torch.relu(self.c1(a))
        c, d = self.c2(b), self.c3(b)
        e = torch.relu(self.c4(b) + c)
        f = self.c5(torch.cat([d, e], 1))
        g = torch.relu(self.c6(F.silu(f)))
        h = torch.relu(self.c7(g))
        side = self.fc_spatial(F.adaptive_avg_pool2d(h, 2).flatten(1))
        k = torch.relu(self.c8(h))
        return self.fc(k.mean((2, 3))) + side[:, :3]


def test_pairs_follow_the_graph_not_the_names():
    pairs = {p.producer: p.consumers for p in find_pairs(Branchy().eval(), torch.randn(1, 3, 16, 16))}
    assert pairs == {"c0": ["c1"], "c1": ["c2", "c3", "c4"], "c6": ["c7"], "c8": ["fc"]}


def numpy_scales(x: np.ndarray, weight: np.ndarray, w_bits: int, a_bits: int, depthwise: bool = False) -> np.ndarray:
    """The noise balance written out in numpy for one consumer (dense, or depthwise: filter c reads channel c) with
    per-output-channel min-max weights: s_c^4 = sum_o,t W^2 * P(x_c != 0) * (max|x| / (2^a - 1))^2 / 12
    / (sum_o,t e^2 * E[x_c^2]), clamped to [1, max|x| / max|x_c|]."""
    qmax = 2 ** (w_bits - 1) - 1
    step = np.abs(weight).reshape(len(weight), -1).max(1) / qmax
    codes = np.clip(np.floor(weight / step[:, None, None, None] + 0.5), -qmax, qmax)
    error = codes * step[:, None, None, None] - weight
    per_input = (lambda a: a.sum((1, 2, 3))) if depthwise else (lambda a: a.sum((0, 2, 3)))
    channels = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    amax = np.abs(channels).max(1)
    share, mean_square = (channels != 0).mean(1), (channels ** 2).mean(1)
    act = per_input(weight ** 2) * share * (amax.max() / (2 ** a_bits - 1)) ** 2 / 12
    wgt = per_input(error ** 2) * mean_square
    return np.minimum(np.maximum((act / wgt) ** 0.25, 1.0), amax.max() / amax)


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("bits", [(8, 8), (8, 4), (4, 8)])
def test_scales_are_the_noise_balance(bits, depthwise):
    gen = torch.Generator().manual_seed(0)
    ranges = torch.tensor([50.0, 1.0, 0.05, 3.0, 0.5, 8.0]).reshape(1, -1, 1, 1)
    x = torch.relu(torch.randn(16, 6, 5, 5, generator=gen)) * ranges      # post-ReLU, channel ranges 0.05 .. 50
    conv = nn.Conv2d(6, 6, 3, groups=6) if depthwise else nn.Conv2d(6, 7, 3)
    stats = _ChannelStats()
    stats.update(x[:9])
    stats.update(x[9:])                                                   # streamed over two batches
    got = channel_scales(stats, [conv], [bits], "minmax", unsigned=True)
    expected = numpy_scales(x.double().numpy(), conv.weight.detach().double().numpy(), *bits, depthwise=depthwise)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)   # repq rounds the weights in float32
    assert got[0] == 1.0 and (got >= 1).all()            # the largest channel keeps its range
    assert bool((stats.amax * got <= stats.amax.max() * (1 + 1e-9)).all())   # no channel outgrows it


def test_dead_channels_stay_and_an_all_zero_tensor_is_left_alone():
    x = torch.relu(torch.randn(8, 4, 6, 6)) * torch.tensor([10.0, 1.0, 0.1, 0.0]).reshape(1, -1, 1, 1)
    stats = _ChannelStats()
    stats.update(x)
    got = channel_scales(stats, [nn.Conv2d(4, 3, 3)], [(8, 4)], "cfws", unsigned=True)
    assert torch.isfinite(got).all() and got[3] == 1.0 and got[2] > 1.0   # no division by zero
    zeros = _ChannelStats()
    zeros.update(torch.zeros(2, 4, 3, 3))
    assert torch.equal(channel_scales(zeros, [nn.Conv2d(4, 3, 3)], [(8, 8)], "cfws", unsigned=True),
                       torch.ones(4, dtype=torch.float64))


def tiny_repvgg_fused(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = repq.create_model("repvgg_b1g2", num_classes=5, in_chans=1, small_input=True, width_scale=0.125)
    for m in model.modules():          # trained-looking BN statistics, channels of very different sizes
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.2, 2.0)
            m.weight.data.uniform_(0.05, 3.0)
    return repq.reparameterize(model.eval())


@torch.no_grad()
def test_equalization_keeps_the_function_and_scales_rows_and_columns():
    fused = tiny_repvgg_fused()
    images = torch.randn(12, 1, 16, 16)
    before = {n: m.weight.detach().clone() for n, m in fused.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    reference = fused(images)
    widths = dict.fromkeys(before, (8, 6))
    record = equalize_activations(fused, images, widths, "cfws", unsigned=True)
    assert set(record.pairs) == set(list(before)[:-1])    # a plain chain: every layer but the classifier
    torch.testing.assert_close(fused(images), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    # the stem's rows are scaled by s (its input is the image: no column scale), the next layer's columns by 1/s
    # (and its rows by its own pair's scale)
    pair = record.pairs["stage0.rbr_reparam"]
    assert pair["consumers"] == ["stage1.0.rbr_reparam"] and pair["max_scale"] > 1
    stem = fused.get_submodule("stage0.rbr_reparam").weight
    s = (stem / before["stage0.rbr_reparam"]).flatten(1)
    torch.testing.assert_close(s, s[:, :1].expand_as(s))
    s = s[:, 0]
    assert float(s.max()) == pytest.approx(pair["max_scale"], rel=1e-5)
    rows = fused.get_submodule("stage1.0.rbr_reparam").weight * s.reshape(1, -1, 1, 1) / before["stage1.0.rbr_reparam"]
    rows = rows.flatten(1)
    torch.testing.assert_close(rows, rows[:, :1].expand_as(rows))


@pytest.mark.filterwarnings("ignore:no re-parameterizable block")
@torch.no_grad()
def test_equalization_gives_small_channels_their_levels():
    """Channel 1 of conv1's output is 200x smaller than channel 0, and conv2 reads it with a 200x larger weight:
    at 6 activation bits a shared per-tensor grid rounds channel 1 to a few levels. With equalization the
    quantized network is much closer to float, and its float function is unchanged."""
    conv1, conv2 = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
    conv1.weight.copy_(torch.diag(torch.tensor([1.0, 0.005])).reshape(2, 2, 1, 1))
    conv2.weight.copy_(torch.tensor([[1.0, 200.0], [0.5, -150.0]]).reshape(2, 2, 1, 1))
    conv1.bias.zero_()
    conv2.bias.zero_()
    net = nn.Sequential(conv1, nn.ReLU(), conv2).eval()
    gen = torch.Generator().manual_seed(1)
    images, test = torch.randn(32, 2, 8, 8, generator=gen).abs(), torch.randn(64, 2, 8, 8, generator=gen).abs()
    errors = {}
    for equalize in (False, True):
        q = repq.quantize(net, images, repq.PTQConfig(w_bits=8, a_bits=6, num_samples=32, equalize=equalize,
                                                      bias_correction=False))
        errors[equalize] = float(((q(test) - net(test)) ** 2).mean() / (net(test) ** 2).mean())
        eq = q.repq_quant["equalization"]
        assert bool(eq["pairs"]) == equalize and eq["kept"]
    assert errors[True] < errors[False] / 20, errors


def test_guard_drops_an_equalization_that_hurts(monkeypatch):
    """Scales far beyond the noise balance crush the consumers' weights below their grid; the guard sees the
    network output get worse than the plain baseline, quantizes without equalization and keeps that."""
    fused = tiny_repvgg_fused(1)
    images = torch.randn(16, 1, 16, 16)
    plain = repq.quantize(fused, images, repq.PTQConfig(num_samples=16, equalize=False))
    def one_channel_dominates(stats, *args, **kwargs):    # channel 0 takes over every tensor's grid
        return torch.ones_like(stats.amax).index_fill_(0, torch.tensor([0]), 1e4)
    monkeypatch.setattr(equalization, "channel_scales", one_channel_dominates)
    q = repq.quantize(fused, images, repq.PTQConfig(num_samples=16))
    eq = q.repq_quant["equalization"]
    assert eq["pairs"] and eq["kept"] is False
    with torch.no_grad():
        torch.testing.assert_close(q(images), plain(images), rtol=0, atol=0)


def test_per_tensor_weights_and_the_switch_leave_the_model_alone():
    fused = tiny_repvgg_fused(2)
    images = torch.randn(8, 1, 16, 16)
    q = repq.quantize(fused, images, repq.PTQConfig(num_samples=8, weight_granularity="tensor"))
    assert not q.repq_quant["equalization"]["pairs"] and "per-tensor" in q.repq_quant["equalization"]["skipped"]
    q = repq.quantize(fused, images, repq.PTQConfig(num_samples=8, equalize=False))
    assert not q.repq_quant["equalization"]["pairs"]


@torch.no_grad()
def test_equalized_model_round_trips(tmp_path):
    fused = tiny_repvgg_fused(3)
    images = torch.randn(24, 1, 16, 16)
    q = repq.quantize(fused, images, repq.PTQConfig(num_samples=24, cfws_deploy="two_branch", quantize_pool=True))
    assert q.repq_quant["equalization"]["pairs"]
    repq.save_checkpoint(tmp_path / "q.pt", q)
    loaded, _ = repq.load_checkpoint(tmp_path / "q.pt")
    torch.testing.assert_close(loaded(images), q(images), rtol=0, atol=0)

"""Shared fixtures: tiny models with randomized BN statistics and one quickly trained digits model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import repq


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN statistics far from the defaults, so that folding mistakes cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) * 3 - 1.5)
                m.bias.copy_(torch.randn(n, generator=gen))
                m.running_mean.copy_(torch.randn(n, generator=gen) * 2)
                m.running_var.copy_(torch.rand(n, generator=gen) * 4 + 0.05)
    return model.eval()


def tiny(name: str = "repvgg_a0", **kwargs) -> nn.Module:
    args = dict(num_classes=10, in_chans=1, small_input=True, width_scale=0.125)
    args.update(kwargs)
    return repq.create_model(name, **args)


@pytest.fixture(autouse=True)
def seeded_torch():
    """torch 2.13 starts every process from a random seed: seed each test, so a run repeats the one before."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits():
    return repq.load_dataset("digits", "train"), repq.load_dataset("digits", "test")


@pytest.fixture(scope="session")
def trained_digits_model(digits):
    """A RepVGG-A0 at 1/4 width trained on digits for a few seconds (about 95% top-1)."""
    train_ds, _ = digits
    torch.manual_seed(0)  # the same model whichever test asks first
    model = tiny(width_scale=0.25)
    repq.train(model, train_ds, repq.TrainConfig(epochs=12, batch_size=64, lr=0.05, seed=0), progress=False)
    return model.eval()

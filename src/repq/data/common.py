"""What the in-memory and the streamed datasets share: the per-epoch image order with its rank shard, and the
per-batch normalization of uint8 images."""
from __future__ import annotations

import torch
from torch import Tensor


def epoch_order(n: int, shuffle: bool, gen: torch.Generator, rank: int = 0, world_size: int = 1) -> Tensor:
    """Indices of one epoch (a permutation drawn from `gen` with `shuffle`); with `world_size` > 1 this rank's
    shard, all shards of equal size (as DistributedSampler with drop_last)."""
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    if world_size > 1:
        order = order[:n - n % world_size][rank::world_size]
    return order


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 images (N, C, H, W) -> float, (x / 255 - mean) / std per channel."""
    return (images.float() / 255.0 - torch.tensor(mean).reshape(1, -1, 1, 1)) / torch.tensor(std).reshape(1, -1, 1, 1)

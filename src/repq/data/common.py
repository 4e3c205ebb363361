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


class InMemoryImages:
    """What the in-memory datasets (classification and detection) share: uint8 images (N, C, H, W) in `images`,
    class names in `classes`, normalization `mean` / `std` (per channel, 0..1 scale)."""

    images: Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> list[int]:
        return list(self.images.shape[1:])

    def normalize(self, images: Tensor) -> Tensor:
        return normalize(images, self.mean, self.std)

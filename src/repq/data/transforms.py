"""The standard ImageNet transforms on Pillow images, without torchvision: evaluation resizes the shorter side to
`size / crop_pct` and center-crops `size`; training takes a random-resized crop (area 8-100 %, aspect 3/4-4/3)
and a random horizontal flip. Each returns a uint8 CHW array; normalization happens per batch."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")


@dataclass(frozen=True)
class ImageTransform:
    """How streamed images become model inputs (the checkpoint records these next to the data name)."""

    size: int = 224
    crop_pct: float = 0.875          # eval: shorter side -> floor(size / crop_pct), then a center crop of `size`
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    scale: tuple[float, float] = (0.08, 1.0)        # train: random-resized-crop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)     # train: aspect ratio range

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError("mean and std need one value per channel, std > 0")


def _resample(name: str) -> int:
    from PIL import Image
    return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
            "lanczos": Image.LANCZOS}[name]


def _chw(img) -> np.ndarray:
    """A writable, contiguous uint8 C x H x W copy of a Pillow image."""
    array = np.asarray(img, dtype=np.uint8)
    return np.array(array[None] if array.ndim == 2 else array.transpose(2, 0, 1), order="C", copy=True)


def eval_transform(img, t: ImageTransform) -> np.ndarray:
    """Resize the shorter side to floor(size / crop_pct) (the longer one in proportion), center-crop size x size."""
    width, height = img.size
    short = int(math.floor(t.size / t.crop_pct))
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    img = img.resize((new_w, new_h), _resample(t.interpolation))
    left, top = int(round((new_w - t.size) / 2.0)), int(round((new_h - t.size) / 2.0))
    return _chw(img.crop((left, top, left + t.size, top + t.size)))


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height): 10 tries at a random area and log-uniform aspect, else the largest
    central crop inside the aspect range (the algorithm of torchvision's RandomResizedCrop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target * aspect)))
        crop_h = int(round(math.sqrt(target / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, width - crop_w), rng.randint(0, height - crop_h), crop_w, crop_h
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def train_transform(img, t: ImageTransform, rng: random.Random) -> np.ndarray:
    """A random-resized crop to size x size, flipped left-right with probability 1/2."""
    from PIL import Image
    left, top, crop_w, crop_h = random_resized_crop_box(img.size[0], img.size[1], rng, t.scale, t.ratio)
    img = img.resize((t.size, t.size), _resample(t.interpolation), box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return _chw(img)

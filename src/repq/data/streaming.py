"""Image datasets read lazily from disk: an ImageFolder tree or a file list, decoded by DataLoader workers with the
standard ImageNet transforms. Memory is bounded by batch size x workers, whatever the number of images; the file
paths live in one numpy byte array so forked workers do not copy them page by page."""
from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from repq.data.common import epoch_order, normalize
from repq.data.memory import release_free_memory
from repq.data.transforms import ImageTransform, eval_transform, train_transform
from repq.errors import RepqError

# images decoded (by each worker, and by the main process's batches) between two returns of freed heap pages to the
# system (repq.data.memory): about once per batch, which keeps a 20k-image run at a 2k-image run's peak
TRIM_EVERY = 64
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class _Reader(torch.utils.data.Dataset):
    """Decodes one image per index; a file that cannot be read comes back as label -1 with its path and error, so
    the main process reports it in one line (an exception inside a worker would arrive as a traceback)."""

    def __init__(self, data: "StreamingImageDataset", train: bool, seed: int) -> None:
        self.paths, self.labels, self.transform = data.paths, data.label_array, data.transform
        self.train, self.seed = train, seed
        self.decoded = 0   # per worker process (each holds its own copy)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str]:
        from PIL import Image, UnidentifiedImageError

        path = self.paths[index].decode()
        self.decoded += 1
        if self.decoded % TRIM_EVERY == 0 and torch.utils.data.get_worker_info() is not None:
            release_free_memory()   # in a worker (without workers the batch loop below trims)
        try:
            with Image.open(path) as img:
                img = img.convert("RGB" if len(self.transform.mean) == 3 else "L")
                if self.train:   # seeded per (epoch seed, image): the same crops whichever worker decodes it
                    array = train_transform(img, self.transform, random.Random(f"{self.seed}:{index}"))
                else:
                    array = eval_transform(img, self.transform)
            return torch.from_numpy(array), int(self.labels[index]), ""
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            size = self.transform.size
            return torch.zeros(len(self.transform.mean), size, size, dtype=torch.uint8), -1, \
                f"{path} ({exc.__class__.__name__})"


class StreamingImageDataset:
    """Labelled image files decoded on demand; the same interface as the in-memory ImageDataset (batches,
    calibration_images, head, subset), so training, calibration and evaluation take either."""

    def __init__(self, paths: list[str], labels: list[int], classes: list[str], transform: ImageTransform,
                 name: str, workers: int = 2, skip_corrupt: bool = False) -> None:
        self.paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_)
        self.label_array = np.asarray(labels, dtype=np.int64)
        self.classes, self.transform, self.name = classes, transform, name
        self.workers, self.skip_corrupt = workers, skip_corrupt
        self.skipped: set[str] = set()   # unreadable files left out (with skip_corrupt)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labels(self) -> Tensor:
        return torch.from_numpy(self.label_array)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return len(self.transform.mean)

    @property
    def input_size(self) -> list[int]:
        return [self.in_chans, self.transform.size, self.transform.size]

    @property
    def mean(self) -> tuple[float, ...]:
        return self.transform.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.transform.std

    def normalize(self, images: Tensor) -> Tensor:
        return normalize(images, self.mean, self.std)

    def _decoded(self, order: list[int], batch_size: int, train: bool = False,
                 seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """uint8 (images, labels) batches of the files in `order`; unreadable files stop the run in one line, or
        are counted in `skipped` and left out with skip_corrupt."""
        loader = torch.utils.data.DataLoader(_Reader(self, train, seed), batch_size=batch_size, sampler=order,
                                             num_workers=self.workers, pin_memory=torch.cuda.is_available())
        since_trim = 0
        for images, labels, errors in loader:
            since_trim += len(labels)
            if since_trim >= TRIM_EVERY:   # the earlier batches and their activations are freed by now
                release_free_memory()
                since_trim = 0
            bad = labels < 0
            if bad.any():
                first = next(e for e in errors if e)
                if not self.skip_corrupt:
                    raise RepqError(f"cannot read image {first}; remove or replace it, or pass --skip-corrupt to "
                                    "leave unreadable files out")
                self.skipped.update(e for e in errors if e)
                images, labels = images[~bad], labels[~bad]
                if not len(labels):
                    continue
            yield images, labels

    def batches(self, batch_size: int = 64, shuffle: bool = False, seed: int = 0, augment: bool = False,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalized (images, labels) batches; train transform with `augment`; with `world_size` > 1 each rank
        reads its own shard (equal sizes, as DistributedSampler with drop_last)."""
        order = epoch_order(len(self), shuffle, torch.Generator().manual_seed(seed), rank, world_size)
        for images, labels in self._decoded(order.tolist(), batch_size, train=augment, seed=seed):
            yield self.normalize(images), labels

    def calibration_images(self, num_samples: int, seed: int = 0) -> Tensor:
        """A seeded random subset of normalized images through the evaluation transform (labels unused)."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        taken, count = [], 0
        for images, _ in self._decoded(order, min(num_samples, 64)):
            taken.append(images[: num_samples - count])
            count += len(taken[-1])
            if count >= num_samples:
                break
        if not taken:
            raise RepqError(f"{self.name}: no readable image to calibrate on")
        return self.normalize(torch.cat(taken))

    def head(self, n: int) -> tuple[Tensor, Tensor]:
        """The first `n` readable images, normalized, with their labels (examples for fusion checks, export)."""
        for images, labels in self._decoded(list(range(len(self))), n):
            return self.normalize(images[:n]), labels[:n]
        raise RepqError(f"{self.name}: no readable image")

    def subset(self, limit: int, seed: int = 0) -> "StreamingImageDataset":
        """A seeded random `limit` images (kept in file order): spread over the classes, unlike the first ones."""
        if limit >= len(self):
            return self
        keep = np.sort(torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:limit].numpy())
        out = copy.copy(self)
        out.paths, out.label_array, out.skipped = self.paths[keep], self.label_array[keep], set()
        return out


def _image_files(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES)


def image_folder(path: str, split: str, transform: ImageTransform, workers: int = 2,
                 skip_corrupt: bool = False) -> StreamingImageDataset:
    """train/ and val/ with one folder per class; the class list always comes from train/ (same label ids for
    both splits)."""
    train_root = Path(path) / "train"
    root = Path(path) / ("train" if split == "train" else "val")
    if not train_root.is_dir() or not root.is_dir():
        raise RepqError(f"{root} not found; an imagefolder needs train/ and val/ with one folder per class")
    classes = sorted(d.name for d in train_root.iterdir() if d.is_dir())
    if not classes:
        raise RepqError(f"{train_root} has no class folders")
    unknown = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in classes)
    if unknown:
        raise RepqError(f"{root} has class folders that train/ lacks ({', '.join(unknown[:3])}); the model cannot "
                        "predict them: add them to train/ or remove them from val/")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        if (root / cls).is_dir():
            files = _image_files(root / cls)
            paths += files
            labels += [label] * len(files)
    if not paths:
        raise RepqError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return StreamingImageDataset(paths, labels, classes, transform, "imagefolder", workers, skip_corrupt)


def file_list(path: str, split: str, transform: ImageTransform, workers: int = 2,
              skip_corrupt: bool = False) -> StreamingImageDataset:
    """FOLDER/train.txt and FOLDER/val.txt, one `relative/path.jpg LABEL` per line (the ImageNet / mmpretrain
    list format; paths relative to FOLDER), and optionally FOLDER/classes.txt with one class name per line."""
    folder = Path(path)
    list_file = folder / ("train.txt" if split == "train" else "val.txt")
    for needed in (folder / "train.txt", list_file):
        if not needed.is_file():
            raise RepqError(f"{needed} not found; a filelist folder needs train.txt and val.txt "
                            "(lines: relative/path.jpg LABEL)")
    paths, labels = _read_list(list_file)
    classes_file = folder / "classes.txt"
    if classes_file.is_file():
        classes = [c.strip() for c in classes_file.read_text(encoding="utf-8").splitlines() if c.strip()]
    else:   # numbered classes: as many as the training list uses, the same for both splits
        train_labels = labels if split == "train" else _read_list(folder / "train.txt")[1]
        classes = [str(i) for i in range(max(train_labels) + 1)]
    if max(labels) >= len(classes):
        raise RepqError(f"{list_file}: labels go up to {max(labels)} but there are {len(classes)} classes "
                        f"({'in ' + str(classes_file) if classes_file.is_file() else 'in train.txt'}); fix the list")
    return StreamingImageDataset(paths, labels, classes, transform, "filelist", workers, skip_corrupt)


def _read_list(list_file: Path) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    with open(list_file, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            name, _, label = line.strip().rpartition(" ")
            if not name.strip() or not label.isdigit():
                raise RepqError(f"{list_file} line {number}: expected 'relative/path.jpg LABEL', got "
                                f"{line.strip()[:60]!r}")
            paths.append(str(list_file.parent / name.strip()))
            labels.append(int(label))
    if not paths:
        raise RepqError(f"{list_file} lists no images")
    return paths, labels

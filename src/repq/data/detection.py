"""Detection data: boxes with class labels on square images held in memory as uint8.

Sources:
- `fashion-mnist-det` / `digits-det`: scenes composed offline from real images (`compose_scenes`). Fashion-MNIST
  items (10 classes; train items for the train split, test items for the val split) or scikit-learn digits are
  pasted, tinted, at several scales, aspect ratios and positions, with partial overlaps, on cluttered backgrounds
  (a colour gradient, noise, and unlabelled digit glyphs as distractors). Boxes are exact: the tight extent of each
  pasted item's visible pixels. Seeded: the same call gives the same scenes.
- `coco:DIR`: a COCO instances file per split (`DIR/annotations/instances_{train,val}*.json`) and its images.
- `yolo:DIR`: the ultralytics layout, `DIR/images/{train,val}/` with `DIR/labels/{train,val}/<stem>.txt` lines
  `class cx cy w h` (normalized), class names in `DIR/classes.txt` (one per line).
User images are letterboxed (aspect kept, padded with grey 114) to `image_size` and decoded into memory; boxes and
mAP live in that letterboxed frame (IoU, hence mAP@0.5:0.95, is unchanged by the uniform scale and shift).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from repq.data.common import InMemoryImages, epoch_order
from repq.errors import RepqError

Target = tuple[Tensor, Tensor]   # boxes (n, 4) x1y1x2y2 pixels, labels (n,) long
DETECTION_SOURCES = ("fashion-mnist-det", "digits-det", "coco", "yolo")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class DetectionDataset(InMemoryImages):
    """uint8 images (N, C, S, S), per-image boxes and labels; batches are (normalized images, targets)."""

    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    augmentation: str = "flip"   # what augment=True applies: flip | none
    meta: dict = field(default_factory=dict)

    task = "detect"

    def __post_init__(self) -> None:
        if not (len(self.images) == len(self.boxes) == len(self.labels)):
            raise ValueError("images, boxes and labels differ in length")

    @property
    def num_boxes(self) -> int:
        return sum(len(lab) for lab in self.labels)

    def targets(self, index: Tensor | list[int]) -> list[Target]:
        return [(self.boxes[i], self.labels[i]) for i in index]

    def batches(self, batch_size: int = 32, shuffle: bool = False, seed: int = 0, augment: bool = False,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, list[Target]]]:
        """(normalized images, [(boxes, labels)] per image); `augment` flips half the images horizontally."""
        gen = torch.Generator().manual_seed(seed)
        order = epoch_order(len(self), shuffle, gen, rank, world_size)
        width = self.images.shape[-1]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size].tolist()
            images = self.images[idx]
            targets = self.targets(idx)
            if augment and self.augmentation == "flip":
                flips = (torch.rand(len(idx), generator=gen) < 0.5).tolist()
                images = images.clone()
                for j, flip in enumerate(flips):
                    if flip:
                        images[j] = images[j].flip(-1)
                        b = targets[j][0].clone()
                        b[:, [0, 2]] = width - targets[j][0][:, [2, 0]]
                        targets[j] = (b, targets[j][1])
            yield self.normalize(images), targets

    def calibration_images(self, num_samples: int, seed: int = 0) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=gen)[:num_samples]
        return self.normalize(self.images[idx])

    def head(self, n: int) -> tuple[Tensor, list[Target]]:
        return self.normalize(self.images[:n]), self.targets(range(min(n, len(self))))

    def subset(self, limit: int, seed: int = 0) -> "DetectionDataset":
        if limit >= len(self):
            return self
        return dataclasses.replace(self, images=self.images[:limit], boxes=self.boxes[:limit],
                                   labels=self.labels[:limit])


# ---------------------------------------------------------------- composed scenes
def _resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(array).resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int, channels: int, glyphs: np.ndarray) -> np.ndarray:
    """A colour gradient with noise and 2-8 faint unlabelled glyphs (distractors), float in [0, 1], (H, W, C)."""
    a, b = rng.uniform(0.0, 0.6, channels), rng.uniform(0.0, 0.6, channels)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    canvas = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    canvas += rng.normal(0.0, 0.04, canvas.shape)
    for _ in range(rng.integers(2, 9)):
        glyph = glyphs[rng.integers(len(glyphs))]
        side = int(rng.integers(size // 10, size // 3 + 1))
        alpha = _resize(glyph, side, side) * rng.uniform(0.3, 0.7)
        y, x = rng.integers(0, size - side + 1, 2)
        colour = rng.uniform(0.2, 1.0, channels)
        region = canvas[y:y + side, x:x + side]
        region[:] = region * (1 - alpha[..., None]) + colour[None, None] * alpha[..., None]
    return canvas


def compose_scenes(objects: np.ndarray, object_labels: np.ndarray, glyphs: np.ndarray, count: int, size: int,
                   seed: int, channels: int = 3, max_objects: int = 6, min_side: float = 0.12,
                   max_side: float = 0.55, max_overlap: float = 0.35) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """`count` scenes of `size` x `size`: 1..max_objects items (uint8 grey images on black, `objects`) per scene, side
    log-uniform in [min_side, max_side] of the image, aspect ratio in [0.7, 1.4], random tint; an item is placed
    only where its box overlaps earlier ones by IoU <= max_overlap (later items partly cover earlier ones).
    Returns uint8 images (count, channels, size, size) and per-image boxes / labels."""
    from repq.detect.boxes import box_iou

    rng = np.random.default_rng(seed)
    images = np.empty((count, channels, size, size), dtype=np.uint8)
    all_boxes, all_labels = [], []
    for n in range(count):
        canvas = _background(rng, size, channels, glyphs)
        boxes: list[list[float]] = []
        labels: list[int] = []
        for _ in range(rng.integers(1, max_objects + 1)):
            for _attempt in range(10):
                side = size * math.exp(rng.uniform(math.log(min_side), math.log(max_side)))
                aspect = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
                w, h = max(4, int(round(side * math.sqrt(aspect)))), max(4, int(round(side / math.sqrt(aspect))))
                if w > size or h > size:
                    continue
                x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
                k = int(rng.integers(len(objects)))
                alpha = _resize(objects[k], w, h)
                visible = alpha > 0.1
                if not visible.any():
                    continue
                rows, cols = np.nonzero(visible.any(1))[0], np.nonzero(visible.any(0))[0]
                box = [x + cols[0], y + rows[0], x + cols[-1] + 1, y + rows[-1] + 1]
                if boxes and float(box_iou(torch.tensor([box], dtype=torch.float32),
                                           torch.tensor(boxes, dtype=torch.float32)).max()) > max_overlap:
                    continue
                colour = rng.uniform(0.35, 1.0, channels)
                region = canvas[y:y + h, x:x + w]
                if region.mean() > 0.4 and rng.random() < 0.5:   # dark items where the ground is light enough
                    colour = colour * rng.uniform(0.0, 0.3)
                region[:] = region * (1 - alpha[..., None]) + colour[None, None] * alpha[..., None]
                boxes.append([float(v) for v in box])
                labels.append(int(object_labels[k]))
                break
        images[n] = np.clip(canvas * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(2, 0, 1)
        all_boxes.append(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        all_labels.append(torch.tensor(labels, dtype=torch.long))
    return torch.from_numpy(images), all_boxes, all_labels


def _digit_glyphs() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_digits
    bunch = sk_digits()
    return np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8), bunch.target.astype(np.int64)


_COMPOSE_VERSION = 1   # bump when compose_scenes changes: cached scenes of an older version are not reused


def _cache_dir() -> Path:
    import os
    return Path(os.environ.get("REPQ_CACHE", Path.home() / ".cache" / "repq")) / "detection"


def _read_cache(key: str) -> dict | None:
    """Composed scenes from an earlier run (tensors only, loaded without running code), or None."""
    path = _cache_dir() / f"{key}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:   # noqa: BLE001 - missing, partial or foreign: compose again
        return None


def _write_cache(key: str, payload: dict) -> None:
    from repq.io import atomic_write
    try:
        _cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write(_cache_dir() / f"{key}.pt", lambda fh: torch.save(payload, fh))
    except OSError:   # a read-only home: compose every time
        pass


# train / val sizes and image side of the built-in composed sets
COMPOSED = {"fashion-mnist-det": {"train": 6000, "test": 1000, "size": 128},
            "digits-det": {"train": 1200, "test": 300, "size": 64}}


def load_composed(kind: str, split: str, count: int | None = None, size: int | None = None,
                  fashion_path: str | None = None) -> DetectionDataset:
    """A built-in composed detection set (see the module docstring); `count` / `size` override the defaults."""
    defaults = COMPOSED[kind]
    count = count or defaults[split]
    size = size or defaults["size"]
    glyphs, glyph_labels = _digit_glyphs()
    if kind == "fashion-mnist-det":
        from repq.data.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
        source = load_fashion_mnist(split, fashion_path)
        objects, labels, classes = source.images[:, 0].numpy(), source.labels.numpy(), FASHION_MNIST_CLASSES
        seed = 1 if split == "train" else 2
    else:   # digits as objects: the split is a fixed half of the glyphs each (the distractors use all of them)
        order = np.random.default_rng(0).permutation(len(glyphs))
        half = order[:len(order) * 4 // 5] if split == "train" else order[len(order) * 4 // 5:]
        objects, labels, classes = glyphs[half], glyph_labels[half], [str(i) for i in range(10)]
        seed = 3 if split == "train" else 4
    key = f"{kind}-{split}-{count}-{size}-{seed}-v{_COMPOSE_VERSION}"
    cached = _read_cache(key)
    if cached is None:
        images, boxes, box_labels = compose_scenes(objects, labels, glyphs, count, size, seed)
        _write_cache(key, {"images": images, "boxes": boxes, "labels": box_labels})
    else:
        images, boxes, box_labels = cached["images"], cached["boxes"], cached["labels"]
    return DetectionDataset(images, boxes, box_labels, list(classes), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), kind,
                            meta={"composed": {"count": count, "size": size, "seed": seed}})


# ---------------------------------------------------------------- user data: COCO json, YOLO txt
def _letterbox(path: Path, size: int) -> tuple[np.ndarray, float, int, int, tuple[int, int]]:
    """The image at `path` scaled (aspect kept) into size x size, padded with grey 114: (CHW uint8, scale,
    pad x, pad y, original (w, h))."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = min(size / w, size / h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            resized = np.asarray(im.resize((nw, nh), Image.BILINEAR), dtype=np.uint8)
    except FileNotFoundError:
        raise RepqError(f"image {path} is missing") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise RepqError(f"image {path} cannot be decoded ({type(exc).__name__}); remove or replace it") from None
    canvas = np.full((size, size, 3), 114, dtype=np.uint8)
    px, py = (size - nw) // 2, (size - nh) // 2
    canvas[py:py + nh, px:px + nw] = resized
    return canvas.transpose(2, 0, 1), scale, px, py, (w, h)


def _split_names(split: str) -> tuple[str, ...]:
    return ("train", "train2017") if split == "train" else ("val", "val2017", "valid", "test")


def _bad(where: Path, what: str) -> RepqError:
    return RepqError(f"{where}: {what}; fix the annotation file")


def load_coco(root: str, split: str, size: int) -> DetectionDataset:
    """COCO instances json (boxes x, y, w, h in pixels; iscrowd boxes ignored) with images found next to it."""
    folder = Path(root)
    if not folder.is_dir():
        raise RepqError(f"--data coco:{root}: no such folder; give the folder holding annotations/")
    candidates = [p for name in _split_names(split) for p in sorted((folder / "annotations").glob(f"instances_{name}*.json"))]
    if not candidates:
        raise RepqError(f"--data coco:{root}: no annotations/instances_{_split_names(split)[0]}*.json for the {split} "
                        "split")
    ann_path = candidates[0]
    try:
        doc = json.loads(ann_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(ann_path, f"not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations", "categories")):
        raise _bad(ann_path, "needs 'images', 'annotations' and 'categories' lists")
    try:
        cat_ids = sorted(int(c["id"]) for c in doc["categories"])
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in doc["categories"]}
        images_info = {int(im["id"]): str(im["file_name"]) for im in doc["images"]}
    except (KeyError, TypeError, ValueError):
        raise _bad(ann_path, "every category needs an 'id' and every image an 'id' and 'file_name'") from None
    if not cat_ids:
        raise _bad(ann_path, "has no categories")
    index_of = {c: i for i, c in enumerate(cat_ids)}
    per_image: dict[int, list[tuple[list[float], int]]] = {i: [] for i in images_info}
    for k, ann in enumerate(doc["annotations"]):
        try:
            image_id, cat, bbox = int(ann["image_id"]), int(ann["category_id"]), [float(v) for v in ann["bbox"]]
        except (KeyError, TypeError, ValueError):
            raise _bad(ann_path, f"annotation {k} needs image_id, category_id and a bbox of 4 numbers") from None
        if len(bbox) != 4 or bbox[2] < 0 or bbox[3] < 0 or not all(math.isfinite(v) for v in bbox):
            raise _bad(ann_path, f"annotation {k} has bbox {ann['bbox']}; it must be [x, y, w, h] with w, h >= 0")
        if cat not in index_of:
            raise _bad(ann_path, f"annotation {k} has category_id {cat}, which is not in 'categories'")
        if image_id not in per_image:
            raise _bad(ann_path, f"annotation {k} refers to image_id {image_id}, which is not in 'images'")
        if ann.get("iscrowd", 0) or bbox[2] * bbox[3] == 0:
            continue
        per_image[image_id].append(([bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]], index_of[cat]))
    image_dirs = [folder / "images" / n for n in _split_names(split)] + [folder / n for n in _split_names(split)] + \
        [folder / "images", folder]
    records = []
    for image_id, file_name in images_info.items():
        path = next((d / file_name for d in image_dirs if (d / file_name).is_file()), image_dirs[0] / file_name)
        records.append((path, per_image[image_id]))
    return _assemble(records, size, [names[c] for c in cat_ids], f"coco:{root}", {"category_ids": cat_ids})


def load_yolo(root: str, split: str, size: int) -> DetectionDataset:
    """YOLO txt labels: one `class cx cy w h` line per box, coordinates normalized to the image."""
    folder = Path(root)
    image_dir = next((folder / "images" / n for n in _split_names(split) if (folder / "images" / n).is_dir()), None)
    if image_dir is None:
        raise RepqError(f"--data yolo:{root}: no images/{_split_names(split)[0]}/ folder for the {split} split")
    label_dir = folder / "labels" / image_dir.name
    names_file = folder / "classes.txt"
    classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()] \
        if names_file.is_file() else None
    paths = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise RepqError(f"--data yolo:{root}: {image_dir} has no images")
    parsed = []
    for path in paths:
        label_path = label_dir / (path.stem + ".txt")
        rows = []
        if label_path.is_file():
            for line_no, line in enumerate(label_path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.split()
                try:
                    cls, cx, cy, w, h = int(parts[0]), *(float(v) for v in parts[1:5])
                except (ValueError, IndexError):
                    raise _bad(label_path, f"line {line_no} is '{line.strip()}'; expected 'class cx cy w h'") from None
                if len(parts) != 5 or cls < 0 or not all(0 <= v <= 1 for v in (cx, cy, w, h)):
                    raise _bad(label_path, f"line {line_no} is '{line.strip()}'; expected 'class cx cy w h' with "
                                           "coordinates in [0, 1]")
                if classes is not None and cls >= len(classes):
                    raise _bad(label_path, f"line {line_no} has class {cls} but classes.txt names {len(classes)}")
                rows.append((cls, cx, cy, w, h))
        parsed.append((path, rows))
    if classes is None:
        top = max((r[0] for _, rows in parsed for r in rows), default=0)
        classes = [str(i) for i in range(top + 1)]
    records = []
    for path, rows in parsed:
        from PIL import Image
        try:
            with Image.open(path) as im:
                w_img, h_img = im.size
        except (OSError, Image.DecompressionBombError) as exc:
            raise RepqError(f"image {path} cannot be decoded ({type(exc).__name__}); remove or replace it") from None
        records.append((path, [([(cx - w / 2) * w_img, (cy - h / 2) * h_img, (cx + w / 2) * w_img,
                                 (cy + h / 2) * h_img], cls) for cls, cx, cy, w, h in rows]))
    return _assemble(records, size, classes, f"yolo:{root}", {})


def _assemble(records: list[tuple[Path, list[tuple[list[float], int]]]], size: int, classes: list[str], name: str,
              meta: dict) -> DetectionDataset:
    """Letterbox every image into memory and move its boxes into the letterboxed frame (clipped to the image)."""
    from tqdm import tqdm
    images = np.empty((len(records), 3, size, size), dtype=np.uint8)
    boxes, labels = [], []
    for i, (path, anns) in enumerate(tqdm(records, desc=f"decoding {name}", unit="img", leave=False, disable=None)):
        images[i], scale, px, py, (w, h) = _letterbox(path, size)
        b = torch.tensor([a[0] for a in anns], dtype=torch.float32).reshape(-1, 4)
        b[:, [0, 2]] = b[:, [0, 2]].clamp(0, w) * scale + px
        b[:, [1, 3]] = b[:, [1, 3]].clamp(0, h) * scale + py
        keep = (b[:, 2] - b[:, 0] > 1) & (b[:, 3] - b[:, 1] > 1)
        boxes.append(b[keep])
        labels.append(torch.tensor([a[1] for a in anns], dtype=torch.long)[keep])
    return DetectionDataset(torch.from_numpy(images), boxes, labels, classes, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), name,
                            meta={**meta, "letterbox": size})


# ---------------------------------------------------------------- writers (to hand composed scenes to other tools)
def _save_images(data: DetectionDataset, folder: Path) -> list[str]:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(data.images):
        name = f"{i:06d}.png"
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(folder / name)
        names.append(name)
    return names


def write_coco(data: DetectionDataset, root: str | Path, split: str = "train") -> Path:
    """Write `data` as a COCO folder (images/<split>/, annotations/instances_<split>.json); returns the json path."""
    root = Path(root)
    names = _save_images(data, root / "images" / split)
    annotations, next_id = [], 1
    for image_id, (b, lab) in enumerate(zip(data.boxes, data.labels), start=1):
        for box, cls in zip(b.tolist(), lab.tolist()):
            annotations.append({"id": next_id, "image_id": image_id, "category_id": cls + 1, "iscrowd": 0,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                "area": (box[2] - box[0]) * (box[3] - box[1])})
            next_id += 1
    doc = {"images": [{"id": i + 1, "file_name": n, "width": data.images.shape[-1], "height": data.images.shape[-2]}
                      for i, n in enumerate(names)],
           "annotations": annotations,
           "categories": [{"id": i + 1, "name": c} for i, c in enumerate(data.classes)]}
    path = root / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def write_yolo(data: DetectionDataset, root: str | Path, split: str = "train") -> Path:
    """Write `data` in the YOLO txt layout (images/<split>/, labels/<split>/, classes.txt); returns root."""
    root = Path(root)
    names = _save_images(data, root / "images" / split)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    size = data.images.shape[-1]
    for name, b, lab in zip(names, data.boxes, data.labels):
        lines = [f"{c} {(x1 + x2) / 2 / size:.6f} {(y1 + y2) / 2 / size:.6f} {(x2 - x1) / size:.6f} "
                 f"{(y2 - y1) / size:.6f}" for (x1, y1, x2, y2), c in zip(b.tolist(), lab.tolist())]
        (root / "labels" / split / (Path(name).stem + ".txt")).write_text("\n".join(lines) + ("\n" if lines else ""))
    (root / "classes.txt").write_text("\n".join(data.classes) + "\n")
    return root


def load_detection(spec: str, split: str, image_size: int | None = None) -> DetectionDataset:
    """`spec`: fashion-mnist-det[:FOLDER] | digits-det | coco:DIR | yolo:DIR; split "train" or "test" (val)."""
    kind, _, path = spec.partition(":")
    if kind in COMPOSED:
        return load_composed(kind, split, size=image_size, fashion_path=path or None)
    if kind in ("coco", "yolo") and path:
        size = image_size or 320
        return (load_coco if kind == "coco" else load_yolo)(path, split, size)
    raise RepqError(f"unknown detection data '{spec}'; use fashion-mnist-det, digits-det, coco:DIR or yolo:DIR")


def is_detection_spec(spec: str) -> bool:
    return spec.partition(":")[0] in DETECTION_SOURCES

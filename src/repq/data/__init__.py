"""Data: offline datasets, seeded splits and calibration subsets, and batch iteration over user data."""
from repq.data.batches import iter_batches, take_images
from repq.data.datasets import ImageDataset, load_dataset

__all__ = ["ImageDataset", "iter_batches", "load_dataset", "take_images"]

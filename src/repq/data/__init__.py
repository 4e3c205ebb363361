"""Data: offline datasets held in memory, image folders and file lists streamed from disk, seeded splits and
calibration subsets, and batch iteration over user data."""
from repq.data.batches import iter_batches, take_images
from repq.data.datasets import ImageDataset, load_dataset
from repq.data.streaming import StreamingImageDataset
from repq.data.transforms import ImageTransform

__all__ = ["ImageDataset", "ImageTransform", "StreamingImageDataset", "iter_batches", "load_dataset", "take_images"]

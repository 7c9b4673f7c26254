"""Validation images for test-time evaluation: one image source, crop stacks made in the workers.

Every (process, loader worker) slot takes its own contiguous range of the validation split (the
trainer's ``equal_ranges``), so each sample is seen exactly once; the evaluation all-reduces
the counts and checks the total against the manifest.
"""
from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset

from pipeline.data.batches import stack_batches
from pipeline.data.prepared import PreparedData, Skipped, equal_ranges, sample_range, worker_slot

from .multi_crop import crop_stack, ffcv_crop_stack


def val_images(data: PreparedData, start: int, stop: int) -> Iterator[tuple[str, Image.Image | np.ndarray | None, int | dict]]:
    """(key, image, label) for validation samples ``start``..``stop - 1``, or (key, None, skip
    record) for one that cannot be read. From shards, an RGB
    image opened but not yet decoded, so that the centre crop can decode a JPEG at reduced scale
    as the trainer does; from an FFCV file, uint8 [H, W, 3] decoded as FFCV's loader decodes it."""
    if data.format == "ffcv":
        from shards.ffcv_files import read_images

        for index, pixels, label in read_images(data.val[0].url, start, stop, as_ffcv_decodes=True):
            yield f"val.beton[{index}]", pixels, label
        return
    for item in sample_range(data.val, start, stop, data.num_classes):
        if isinstance(item, Skipped):  # passed on to the evaluation, which stops on it
            yield item.key, None, item.record("val")
            continue
        key, encoded, label = item.key, item.data, item.label
        try:
            image = Image.open(io.BytesIO(encoded))
            if image.mode != "RGB":  # prepared shards hold RGB JPEGs; anything else is decoded here
                image = image.convert("RGB")
        except Exception as exc:
            reason = f"does not decode ({type(exc).__name__}: {exc})"
            yield key, None, Skipped(item.shard, item.index, key, reason).record("val")
            continue
        yield key, image, label


class CropStream(IterableDataset):
    """Batches of (uint8 crops [images, 1 (+ crops), S, S, 3], labels [images], skip records): the
    trainer's centre crop of each image first, then its ``crops`` test-time crops when more than one."""

    def __init__(self, data: PreparedData, *, crops: int, image_size: int, eval_resize: int,
                 images_per_batch: int, rank: int, world_size: int):
        self.data, self.crops, self.image_size, self.eval_resize = data, crops, image_size, eval_resize
        self.images_per_batch, self.rank, self.world_size = images_per_batch, rank, world_size

    def __iter__(self):
        worker, num_workers = worker_slot()
        slots = equal_ranges(self.data.val_samples, self.world_size * num_workers)
        start, stop = slots[self.rank * num_workers + worker]
        stack = ffcv_crop_stack if self.data.format == "ffcv" else crop_stack  # each cuts as its trainer does

        def stacks():
            for key, image, label in val_images(self.data, start, stop):
                if image is None:
                    yield None, label  # a skip record, for the main process to report
                    continue
                try:
                    yield stack(image, self.crops, self.image_size, self.eval_resize), label
                except Exception as exc:  # a JPEG whose data is damaged fails only when decoded here
                    reason = f"does not decode ({type(exc).__name__}: {exc})"
                    yield None, {"split": "val", "shard": str(self.data.directory), "index": None, "key": key,
                                 "reason": reason}

        yield from stack_batches(stacks(), self.images_per_batch)

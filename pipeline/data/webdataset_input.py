"""WebDataset input: training and validation batches from tar shards, sharded by hand across
ranks and loader workers (``prepared`` cuts the ranges).

Training: an epoch is one copy group of the shards (with K baked copies per image, group
e mod K holds copy e mod K of every source image; unbaked shards are all group 0), so every
source image is seen once per epoch. Rank r's workers together get exactly
``batches_per_epoch`` full batches (the DataLoader takes workers in turn, so worker w gets
batches w, w + n, ...), which makes every rank take the same number of steps and DDP never
waits; the remainder of the epoch (fewer than world x batch samples) is dropped. Shard
contents are fixed at preparation, so each worker reads several of its shard segments at once
(``interleave_shards``), drawing each next sample from a random one of them, and then runs a
seeded shuffle buffer: a sample's neighbours change from epoch to epoch. It then decodes and
crops into uint8 tensors. Everything random is seeded from (seed, epoch, rank, lane, sample),
so a run resumed mid-epoch sees the same batches as an uninterrupted one; the batches it
already did are dropped before decoding. Shards in an object store are read in a few large
ranged reads (``shards.remote``), and a persistent worker opens its next epoch's first segments
as it finishes an epoch, so that their first reads are done when that epoch starts.

Validation: the ranges cover every sample exactly once, nothing padded or dropped; the
trainer all-reduces the counts and checks them against the manifest.

A JPEG is decoded only in the region its crop needs when the region decoder is built
(``imaging.jpeg_region``), and raw-pixel shards are not decoded at all.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from imaging.crops import center_crop_array, decode_random_crop_distorted, random_crop_array
from imaging.photometric import photometric_distort
from imaging.specs import CropSpec, PhotometricSpec
from shards.store import StoreError

from .batches import decode_or_skip, image_batches, make_loader, worker_context
from .prepared import Shard, equal_ranges, mix_seed, sample_range, shard_range, worker_slot


def start_reads(samples) -> None:
    """Send a segment's first reads now (a segment of a shard in an object store; else nothing)."""
    start = getattr(samples, "start", None)
    if start is not None:
        start()


def interleave(segments: list[tuple], rng: random.Random, width: int):
    """Merge ``segments``, (sample iterable, length) pairs, keeping up to ``width`` of them open
    (their first reads sent together) and opening the next in order when one runs out. Each next sample comes from an open
    segment drawn with probability proportional to the samples it has left, so the open
    segments are merged in uniformly random order."""
    pending = iter(segments)
    active: list[list] = []  # [iterator, samples left]

    def refill():
        for samples, length in pending:
            if length > 0:
                start_reads(samples)
                active.append([iter(samples), length])
                if len(active) == width:
                    return

    refill()
    while active:
        pick = rng.randrange(sum(left for _, left in active))
        i = 0
        while pick >= active[i][1]:
            pick -= active[i][1]
            i += 1
        yield next(active[i][0])  # shard_range yields exactly `length` items, damaged or not
        active[i][1] -= 1
        if active[i][1] == 0:
            active.pop(i)
            refill()


class TrainStream(IterableDataset):
    def __init__(self, shards: list[Shard], *, batch_size: int, batches_per_epoch: int, rank: int,
                 world_size: int, seed: int, image_size: int, crop: CropSpec | None,
                 baked: bool, shuffle_buffer: int, eval_resize: int, num_classes: int,
                 photometric: PhotometricSpec | None = None, interleave_shards: int = 4):
        self.shards, self.batch_size, self.batches_per_epoch = shards, batch_size, batches_per_epoch
        self.num_classes = num_classes
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.image_size, self.crop, self.baked = image_size, crop, baked
        self.shuffle_buffer, self.eval_resize = shuffle_buffer, eval_resize
        self.interleave_shards = max(1, interleave_shards)
        # Photometric distortion per image in the workers: for CPU-only training, where the
        # "device" is the main process's cores (on a GPU the trainer does it batched instead).
        self.photometric = photometric
        # Epoch e reads copy group e mod (number of groups): one pass over the source images.
        self.groups = sorted({s.group for s in shards}) or [0]
        self.epoch, self.start_batch = 0, 0
        # Up to this epoch, a worker that goes on with the next epoch (persistent) opens it as it
        # ends one (the trainer sets it to its last epoch; None: never).
        self.open_ahead_until: int | None = None
        self.opened_ahead = None  # ((epoch, lane, lanes), segments)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Call before iterating; ``start_batch`` skips the batches a resumed run already did."""
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_shards(self, epoch: int | None = None) -> list[Shard]:
        """An epoch's shards (one copy group) in that epoch's order, the same on every rank
        (by default the epoch set by ``set_epoch``)."""
        epoch = self.epoch if epoch is None else epoch
        group = self.groups[epoch % len(self.groups)]
        order = [s for s in self.shards if s.group == group]
        random.Random(mix_seed(self.seed, epoch, "shards")).shuffle(order)
        return order

    def lane_segments(self, lane: int, num_lanes: int, epoch: int) -> list[tuple]:
        """The lane's contiguous range of the epoch's shard sequence, cut into per-shard segments
        ((sample iterator, length) pairs). Nothing is read yet (``start_reads``)."""
        needed = self.world_size * self.batches_per_epoch * self.batch_size
        shards = self.epoch_shards(epoch)
        available = sum(s.samples for s in shards)
        if needed > available:
            raise ValueError(f"{self.world_size} ranks x {self.batches_per_epoch} batches x {self.batch_size} "
                             f"samples exceed the epoch's {available} training samples")
        batches = [len(range(i, self.batches_per_epoch, num_lanes)) for i in range(num_lanes)]
        start = (self.rank * self.batches_per_epoch + sum(batches[:lane])) * self.batch_size
        stop = start + batches[lane] * self.batch_size
        segments, offset = [], 0
        for shard in shards:
            first, last = max(offset, start) - offset, min(offset + shard.samples, stop) - offset
            if first < last:
                segments.append((shard_range(shard, first, last, self.num_classes), last - first))
            offset += shard.samples
        return segments

    def lane_samples(self, lane: int, num_lanes: int, epoch: int | None = None, segments: list | None = None):
        """The Sample (or Skipped) items of lane ``lane`` of ``num_lanes`` (batches lane, lane + n, ...
        of this rank's epoch), in training order, all of them (also those before start_batch).

        The lane's segments (``lane_segments``, or those given, opened ahead) are read
        ``interleave_shards`` at a time, then passed through the shuffle buffer."""
        epoch = self.epoch if epoch is None else epoch
        segments = self.lane_segments(lane, num_lanes, epoch) if segments is None else segments
        rng = random.Random(mix_seed(self.seed, epoch, self.rank, lane, "interleave"))
        samples = interleave(segments, rng, self.interleave_shards)
        if self.shuffle_buffer > 1:
            rng = random.Random(mix_seed(self.seed, epoch, self.rank, lane, "buffer"))
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        yield from samples

    def decode(self, data: bytes, seed: int) -> np.ndarray:
        """The training image of one sample, uint8 [size, size, 3]."""
        size = self.image_size
        if self.baked:  # already cropped and distorted at preparation time
            return center_crop_array(data, size, size)
        if self.crop is None:
            image = center_crop_array(data, size, self.eval_resize)
            if self.photometric is None:
                return image
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
            distorted = photometric_distort(pixels, self.photometric, torch.Generator().manual_seed(seed))
            return distorted.mul_(255).round_().to(torch.uint8).permute(1, 2, 0).numpy()
        if self.photometric is not None:
            return decode_random_crop_distorted(data, size, self.crop, random.Random(seed), self.photometric,
                                                        torch.Generator().manual_seed(seed)).permute(1, 2, 0).numpy()
        return random_crop_array(data, size, self.crop, random.Random(seed))

    def __iter__(self):
        worker, num_workers = worker_slot()
        # The DataLoader takes workers in turn, starting with worker 0, so lane l (batches
        # l, l + n, ... of the epoch) must be served by the worker whose turn batch l is. After a
        # resume at start_batch the turns are rotated: worker w serves lane (w + start_batch) % n.
        epoch, start_batch = self.epoch, self.start_batch
        # A persistent worker keeps this object: its next iteration is the next epoch, from its
        # start (the main process calls set_epoch before every iteration of its own copy).
        self.epoch, self.start_batch = epoch + 1, 0
        lane = (worker + start_batch) % num_workers
        skip = len(range(lane, min(start_batch, self.batches_per_epoch), num_workers))
        base = mix_seed(self.seed, epoch, self.rank, lane, "augment")
        opened, self.opened_ahead = self.opened_ahead, None
        segments = opened[1] if opened is not None and opened[0] == (epoch, lane, num_workers) else None

        def decoded():
            for i, item in enumerate(self.lane_samples(lane, num_workers, epoch, segments)):
                if i < skip * self.batch_size:
                    continue  # resumed mid-epoch: these batches were already trained on
                yield decode_or_skip(item, lambda data: self.decode(data, base + i), "train")

        yield from image_batches(decoded(), self.batch_size, self.image_size, keep_skipped=True)
        if self.open_ahead_until is not None and epoch < self.open_ahead_until and \
                any(s.remote is not None for s in self.shards):
            # The next epoch's segments are opened now, while the last batches train and the model
            # is validated: their first reads from the object store are done when that epoch starts.
            try:
                segments = self.lane_segments(worker, num_workers, epoch + 1)
            except (StoreError, ValueError):
                segments = None  # said when that epoch starts
            if segments is not None:
                for samples, _ in segments[:self.interleave_shards]:  # those read first; the rest as they come
                    start_reads(samples)
                self.opened_ahead = ((epoch + 1, worker, num_workers), segments)


class EvalStream(IterableDataset):
    """Each validation sample once, in one (rank, worker) slot; the last batch may be short."""

    def __init__(self, shards: list[Shard], *, batch_size: int, rank: int, world_size: int,
                 image_size: int, resize: int, num_classes: int):
        self.shards, self.batch_size, self.num_classes = shards, batch_size, num_classes
        self.rank, self.world_size, self.image_size, self.resize = rank, world_size, image_size, resize

    def __iter__(self):
        worker, num_workers = worker_slot()
        total = sum(s.samples for s in self.shards)
        start, stop = equal_ranges(total, self.world_size * num_workers)[self.rank * num_workers + worker]

        items = sample_range(self.shards, start, stop, self.num_classes)
        decode = lambda data: center_crop_array(data, self.image_size, self.resize)  # noqa: E731
        decoded = (decode_or_skip(item, decode, "val") for item in items)
        yield from image_batches(decoded, self.batch_size, self.image_size, keep_skipped=False)


class WebDatasetInput:
    """The trainer's view of the shards: training batches per epoch, validation batches.

    The training workers persist from epoch to epoch (no start-up per epoch): each worker
    computes the next epoch's plan itself. A resumed epoch (``start_batch`` > 0), or an epoch
    other than the next, starts fresh workers from that point. The validation workers persist
    too, from one validation to the next. Workers come from a fork server (``worker_context``),
    started here so that it imports their modules while the trainer builds the rest."""

    def __init__(self, train: TrainStream, val: EvalStream, workers: int, pin_memory: bool):
        self.train, self.val, self.workers, self.pin_memory = train, val, workers, pin_memory
        self.train_loader, self.next_epoch, self.val_loader = None, None, None
        if workers:
            worker_context()

    def train_batches(self, epoch: int, start_batch: int = 0):
        self.train.set_epoch(epoch, start_batch)
        if self.train_loader is None or (epoch, start_batch) != (self.next_epoch, 0):
            self.train_loader = make_loader(self.train, self.workers, self.pin_memory, persistent=True)
        self.next_epoch = epoch + 1
        return iter(self.train_loader)

    def val_batches(self):
        if self.val_loader is None:
            self.val_loader = make_loader(self.val, self.workers, self.pin_memory, persistent=True)
        return iter(self.val_loader)

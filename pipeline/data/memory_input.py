"""In-memory input for datasets that fit in memory (CIFAR-10/100, STL-10): decode once, crop on
the device.

At the start, the prepared shards are decoded once (in ``workers`` processes) into one uint8
tensor per split, [N, 3, H, W], kept on the training device: GPU memory under CUDA (CIFAR-10's
50,000 training images take 150 MB), host memory otherwise. Every image must have the same size
(the datasets this is for are stored at their native 32 or 96 px); a damaged sample stops the
run at loading, naming it, whatever ``data.on_bad_sample`` says (nothing is decoded later, so
there is nothing to skip then).

Training, the same contract as :class:`pipeline.data.WebDatasetInput`:
``train_batches(epoch, start_batch)`` yields (uint8 images [B, 3, S, S], int64 labels, ())
on the device. Each epoch is one permutation of the training set, drawn from (seed, epoch),
the same on every rank; rank r takes the r-th run of ``batches_per_epoch`` batches of it, so
every rank has the same number of full batches and no sample is seen twice in an epoch (the
remainder, fewer than world x batch samples, is left out, as the shard loader does). The
random-resized crop (torchvision's RandomResizedCrop box distribution, drawn vectorised) and the
flip of batch b are drawn from (seed, epoch, rank, b) on the CPU, so a run resumed at
``start_batch`` gets exactly the batches an uninterrupted one would, on any device. The crops
are resampled together on the device with ``torchvision.ops.roi_align`` (bilinear; where a crop
is shrunk, several samples per output pixel are averaged, which keeps it from aliasing). The
configured interpolations do not apply here: always bilinear.

Validation: ``val_batches()`` gives rank r the r-th of ``world`` contiguous, near-equal ranges
of the validation set, so every sample is evaluated exactly once across ranks; each image gets
the evaluation transform (shorter side to ``eval_resize``, centre crop ``image_size``: the
same box as the shard loader's, resampled bilinearly on the device).
"""
from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.ops import roi_align

from imaging.crops import center_box
from imaging.specs import CropSpec
from pipeline.config import ConfigError

from .batches import worker_pool
from .prepared import BadSampleError, PreparedData, Sample, Shard, Skipped, equal_ranges, mix_seed, shard_range


@dataclass
class DecodedShard:
    url: str
    images: np.ndarray  # uint8 [n, H, W, 3]
    labels: np.ndarray  # int64 [n]


def decode_shard(shard: Shard, num_classes: int) -> DecodedShard:
    """Every sample of one shard (read as the shard loader reads it), decoded with Pillow; a
    sample that cannot be read or decoded raises BadSampleError naming it."""
    images, labels = [], []
    for item in shard_range(shard, 0, shard.samples, num_classes):
        if isinstance(item, Sample):
            try:
                with Image.open(io.BytesIO(item.data)) as image:
                    images.append(np.asarray(image.convert("RGB")))
            except Exception as exc:  # any decoder failure is this sample's
                item = Skipped(item.shard, item.index, item.key, f"does not decode ({type(exc).__name__}: {exc})")
            else:
                labels.append(item.label)
                continue
        where = f"sample {item.key}" if item.key else f"sample #{item.index}"
        raise BadSampleError(f"{item.shard}: {where} {item.reason} (data.loader=memory stops on any; "
                             f"check the shards with 'python -m data_prep verify')")
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise ConfigError(f"data.loader=memory: {shard.url} holds images of several sizes ({sorted(sizes)[:3]}); "
                          f"the in-memory loader needs one size (CIFAR, STL-10); use the shard loader")
    stacked = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
    return DecodedShard(shard.url, stacked, np.asarray(labels, dtype=np.int64))


def decode_pool(processes: int):
    """Decode processes started by the loader workers' fork server: the training process already
    runs the process group's (and CUDA's) threads, and a fork copies their locks in whatever
    state they are in."""
    return worker_pool(processes)


def decode_split(shards: list[Shard], workers: int, where: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All shards of a split, in order: (uint8 [N, 3, H, W], int64 [N]) in host memory."""
    decode = functools.partial(decode_shard, num_classes=num_classes)
    if workers > 0 and len(shards) > 1:
        with decode_pool(min(workers, len(shards))) as pool:
            decoded = pool.map(decode, shards)
    else:
        decoded = [decode(s) for s in shards]
    decoded = [d for d in decoded if len(d.images)]
    sizes = {d.images.shape[1:] for d in decoded}
    if len(sizes) != 1:
        raise ConfigError(f"data.loader=memory: the shards of {where} hold images of several sizes "
                          f"({sorted(sizes)[:3]}); the in-memory loader needs one size")
    images = torch.from_numpy(np.concatenate([d.images for d in decoded])).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(np.concatenate([d.labels for d in decoded]))


def sample_boxes(n: int, width: int, height: int, spec: CropSpec,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` crop boxes (x1, y1, x2, y2 in pixels, float) and flips, drawn as torchvision's
    ``RandomResizedCrop.get_params`` draws one (10 tries of area and log-aspect, else a centre
    crop clamped to the aspect range), vectorised."""
    tries = 10
    area = width * height
    draws = torch.rand(n, tries, 2, generator=generator, dtype=torch.float64)
    target = area * (spec.area[0] + (spec.area[1] - spec.area[0]) * draws[..., 0])
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[..., 1])
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1)  # the first try that fits
    rows = torch.arange(n)
    w, h = w[rows, first], h[rows, first]
    # No try fits: the whole image, clamped to the aspect range, centred.
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        fallback = (width, round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        fallback = (round(height * spec.ratio[1]), height)
    else:
        fallback = (width, height)
    fitted = fits.any(dim=1)
    w = torch.where(fitted, w, float(fallback[0]))
    h = torch.where(fitted, h, float(fallback[1]))
    position = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    left = torch.where(fitted, (position[:, 0] * (width - w + 1)).floor(), ((width - w) / 2).floor())
    top = torch.where(fitted, (position[:, 1] * (height - h + 1)).floor(), ((height - h) / 2).floor())
    flips = torch.rand(n, generator=generator) < 0.5 if spec.flip else torch.zeros(n, dtype=torch.bool)
    return torch.stack([left, top, left + w, top + h], dim=1).float(), flips


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor to ``device`` without making the host wait for the device (a copy
    from pageable memory would wait for the queued work first)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def resample(images: torch.Tensor, boxes: torch.Tensor, size: int, flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, 3, H, W] and one box per image (host tensors: boxes, flips) -> uint8
    [B, 3, size, size], computed on the images' device."""
    indices = torch.arange(len(images), dtype=torch.float32)[:, None]
    rois = to_device(torch.cat([indices, boxes], dim=1), images.device)
    # aligned=True: box coordinates are pixel edges (0..W spans the image); sampling_ratio=-1:
    # as many samples per output pixel as the box is larger than the output (anti-aliasing).
    out = roi_align(images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if flips is not None and bool(flips.any()):
        flips = to_device(flips, images.device)
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


class MemoryInput:
    """The trainer's view of a dataset held in memory: ``train_batches``, ``val_batches``."""

    def __init__(self, data: PreparedData, *, batch_size: int, eval_batch_size: int, batches_per_epoch: int,
                 rank: int, world_size: int, seed: int, image_size: int, eval_resize: int,
                 crop: CropSpec | None, device: torch.device | str, workers: int = 0):
        if data.format != "webdataset" or data.augment_copies:
            raise ConfigError("data.loader=memory: reads unbaked WebDataset shards (prepared without "
                              "--augment-copies); it crops on the device itself")
        self.batch_size, self.eval_batch_size, self.batches_per_epoch = batch_size, eval_batch_size, batches_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.image_size, self.eval_resize, self.crop = image_size, eval_resize, crop
        self.device = torch.device(device)
        needed = world_size * batches_per_epoch * batch_size
        if needed > data.train_samples:
            raise ValueError(f"{world_size} ranks x {batches_per_epoch} batches x {batch_size} samples exceed "
                             f"the epoch's {data.train_samples} training samples")
        train_images, train_labels = decode_split(data.train, workers, f"{data.directory} (train)", data.num_classes)
        val_images, val_labels = decode_split(data.val, workers, f"{data.directory} (val)", data.num_classes)
        self.train_images, self.train_labels = train_images.to(self.device), train_labels.to(self.device)
        self.val_images, self.val_labels = val_images.to(self.device), val_labels.to(self.device)
        _, _, self.height, self.width = self.train_images.shape

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's samples of the epoch, in training order: batches_per_epoch x batch_size."""
        order = torch.randperm(len(self.train_labels), generator=torch.Generator().manual_seed(
            mix_seed(self.seed, epoch, "memory-order")))
        per_rank = self.batches_per_epoch * self.batch_size
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def train_batch(self, indices: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        """The augmented images of ``indices`` (on the device): batch ``batch`` of ``epoch``."""
        images = self.train_images.index_select(0, indices)
        if self.crop is None:  # the evaluation transform, as the shard loader does with crop off
            return resample(images, self.eval_boxes(images), self.image_size)
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.rank, batch, "memory-crop"))
        boxes, flips = sample_boxes(len(images), self.width, self.height, self.crop, generator)
        return resample(images, boxes, self.image_size, flips)

    def eval_boxes(self, images: torch.Tensor) -> torch.Tensor:
        """The evaluation transform's box, the same for every image (they have one size)."""
        *_, height, width = images.shape
        box = center_box(width, height, self.image_size, self.eval_resize)
        return torch.tensor([box], dtype=torch.float32).expand(len(images), 4)

    def train_batches(self, epoch: int, start_batch: int = 0):
        indices = to_device(self.epoch_indices(epoch), self.device)  # once per epoch
        for b in range(start_batch, self.batches_per_epoch):
            chosen = indices[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.train_batch(chosen, epoch, b), self.train_labels[chosen], ()

    def val_batches(self):
        start, stop = equal_ranges(len(self.val_labels), self.world_size)[self.rank]
        for first in range(start, stop, self.eval_batch_size):
            last = min(first + self.eval_batch_size, stop)
            images = self.val_images[first:last]
            yield resample(images, self.eval_boxes(images), self.image_size), self.val_labels[first:last], ()

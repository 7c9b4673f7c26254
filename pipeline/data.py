"""WebDataset input pipeline: sharded by hand across ranks and loader workers.

Both splits are cut the same way: the shards, in an order (reshuffled every epoch for
training, the same permutation on every rank), are seen as one sequence of samples whose
length the manifest gives, and every (rank, loader worker) slot reads its own contiguous
range of it, skipping into its first shard and stopping inside its last. So no sample is
read twice, no slot runs short, and no shard needs to be split evenly.

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
already did are dropped before decoding.

Validation: the ranges cover every sample exactly once, nothing padded or dropped; the
trainer all-reduces the counts and checks them against the manifest.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep import augment
from data_prep.manifest import PrepError, load_manifest


def mix_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    group: int = 0  # baked copies: the copy this training shard holds, read in the epochs e with e mod K == group


@dataclass(frozen=True)
class PreparedData:
    directory: Path
    classes: list[dict]
    train: list[Shard]
    val: list[Shard]
    augment_copies: int
    augment_size: int
    format: str = "webdataset"  # or "ffcv": then train and val are one .beton file each

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_samples(self) -> int:
        return sum(s.samples for s in self.train)

    @property
    def val_samples(self) -> int:
        return sum(s.samples for s in self.val)


def open_prepared(directory: str | Path) -> PreparedData:
    """Read the manifest and check that every shard (or .beton file) it names is there."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    splits = manifest["splits"]
    for split in ("train", "val"):
        if split not in splits or not splits[split].get("shards", [splits[split].get("file")]):
            raise PrepError(f"{directory / 'manifest.json'}: no {split} shards (prepare them with --{split})")
    files = {}
    for split in ("train", "val"):
        listed = splits[split]["shards"] if manifest["format"] == "webdataset" else [splits[split]]
        files[split] = []
        for s in listed:
            path = directory / s.get("name", s.get("file"))
            if not path.is_file():
                what = "shard" if manifest["format"] == "webdataset" else "file"
                raise PrepError(f"{path}: {what} listed in the manifest is missing")
            files[split].append(Shard(str(path), s["samples"], s.get("group", 0)))
    params = manifest["parameters"]
    copies = params.get("augment_copies", 0)
    check_groups(files["train"], copies, directory / "manifest.json")
    return PreparedData(directory, manifest["classes"], files["train"], files["val"],
                        copies, params.get("augment_size", 0), manifest["format"])


def check_groups(shards: list[Shard], augment_copies: int, manifest: Path) -> None:
    """Baked copies: groups 0..K-1, all the same size (a bad image is skipped in every copy),
    so that every epoch is one pass over the same source images."""
    sizes: dict[int, int] = {}
    for shard in sorted(shards, key=lambda s: s.group):
        sizes[shard.group] = sizes.get(shard.group, 0) + shard.samples
    expected = list(range(max(1, augment_copies)))
    if list(sizes) != expected or len(set(sizes.values())) > 1:
        raise PrepError(
            f"{manifest}: training shards should form copy groups {expected} of equal size, found "
            f"{sizes} (samples per group); prepare the shards again with this version of data_prep"
        )


def worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _raw_samples(urls: list[str]):
    """(key, jpeg bytes, label) in shard order, read by webdataset."""
    stream = wds.tarfile_to_samples()(({"url": u} for u in urls))
    for sample in stream:
        yield sample["__key__"], sample["jpg"], int(sample["cls"])


def sample_range(shards: list[Shard], start: int, stop: int):
    """Samples ``start``..``stop - 1`` of the concatenated shards, opening only those needed."""
    offset = 0
    for shard in shards:
        first, last = max(offset, start), min(offset + shard.samples, stop)
        if first < last:
            for i, sample in enumerate(_raw_samples([shard.url]), start=offset):
                if i >= last:
                    break
                if i >= first:
                    yield sample
        offset += shard.samples


def equal_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering 0..total, sizes differing by at most one."""
    bounds = [total * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def stack_batches(samples, batch_size: int):
    images, labels = [], []
    for image, label in samples:
        images.append(image)
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels, dtype=torch.int64)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def interleave(segments: list[tuple], rng: random.Random, width: int):
    """Merge ``segments``, (sample iterable, length, shard path) triples, keeping up to ``width`` of them open
    and opening the next in order when one runs out. Each next sample comes from an open
    segment drawn with probability proportional to the samples it has left, so the open
    segments are merged in uniformly random order."""
    pending = iter(segments)
    active: list[list] = []  # [iterator, samples left, shard path]

    def refill():
        for samples, length, path in pending:
            if length > 0:
                active.append([iter(samples), length, path])
                if len(active) == width:
                    return

    refill()
    while active:
        pick = rng.randrange(sum(left for _, left, _ in active))
        i = 0
        while pick >= active[i][1]:
            pick -= active[i][1]
            i += 1
        sample = next(active[i][0], None)
        if sample is None:
            raise RuntimeError(f"{active[i][2]}: the training shard holds fewer samples than the manifest says "
                               f"(check the shards with 'python -m data_prep verify')")
        yield sample
        active[i][1] -= 1
        if active[i][1] == 0:
            active.pop(i)
            refill()


class TrainStream(IterableDataset):
    def __init__(self, shards: list[Shard], *, batch_size: int, batches_per_epoch: int, rank: int,
                 world_size: int, seed: int, image_size: int, crop: augment.CropSpec | None,
                 baked: bool, shuffle_buffer: int, eval_resize: int,
                 photometric: augment.PhotometricSpec | None = None, interleave_shards: int = 4):
        self.shards, self.batch_size, self.batches_per_epoch = shards, batch_size, batches_per_epoch
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

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Call before iterating; ``start_batch`` skips the batches a resumed run already did."""
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_shards(self) -> list[Shard]:
        """The current epoch's shards (one copy group) in this epoch's order, the same on every rank."""
        group = self.groups[self.epoch % len(self.groups)]
        order = [s for s in self.shards if s.group == group]
        random.Random(mix_seed(self.seed, self.epoch, "shards")).shuffle(order)
        return order

    def lane_samples(self, lane: int, num_lanes: int):
        """(key, encoded image, label) of lane ``lane`` of ``num_lanes`` (batches lane, lane + n, ...
        of this rank's epoch), in training order, all of them (also those before start_batch).

        The lane's contiguous range of the epoch's shard sequence is cut into per-shard segments,
        read ``interleave_shards`` at a time, then passed through the shuffle buffer."""
        needed = self.world_size * self.batches_per_epoch * self.batch_size
        shards = self.epoch_shards()
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
                segments.append((sample_range([shard], first, last), last - first, shard.url))
            offset += shard.samples
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, lane, "interleave"))
        samples = interleave(segments, rng, self.interleave_shards)
        if self.shuffle_buffer > 1:
            rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, lane, "buffer"))
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        yield from samples

    def _decode(self, data: bytes, seed: int) -> torch.Tensor:
        if self.baked:  # already cropped and distorted at preparation time
            return augment.decode_center_crop(data, self.image_size, self.image_size)
        if self.crop is None:
            image = augment.decode_center_crop(data, self.image_size, self.eval_resize)
            if self.photometric is None:
                return image
            distorted = augment.photometric_distort(image, self.photometric, torch.Generator().manual_seed(seed))
            return distorted.mul_(255).round_().to(torch.uint8)
        if self.photometric is not None:
            return augment.decode_random_crop_distorted(data, self.image_size, self.crop, random.Random(seed),
                                                        self.photometric, torch.Generator().manual_seed(seed))
        return augment.decode_random_crop(data, self.image_size, self.crop, random.Random(seed))

    def __iter__(self):
        worker, num_workers = worker_slot()
        # The DataLoader takes workers in turn, starting with worker 0, so lane l (batches
        # l, l + n, ... of the epoch) must be served by the worker whose turn batch l is. After a
        # resume at start_batch the turns are rotated: worker w serves lane (w + start_batch) % n.
        lane = (worker + self.start_batch) % num_workers
        skip = len(range(lane, min(self.start_batch, self.batches_per_epoch), num_workers))
        base = mix_seed(self.seed, self.epoch, self.rank, lane, "augment")

        def decoded():
            for i, (key, data, label) in enumerate(self.lane_samples(lane, num_workers)):
                if i < skip * self.batch_size:
                    continue  # resumed mid-epoch: these batches were already trained on
                try:
                    yield self._decode(data, base + i), label
                except Exception as exc:
                    raise RuntimeError(f"training sample {key}: cannot decode ({exc})") from exc

        yield from stack_batches(decoded(), self.batch_size)


class EvalStream(IterableDataset):
    """Each validation sample once, in one (rank, worker) slot; the last batch may be short."""

    def __init__(self, shards: list[Shard], *, batch_size: int, rank: int, world_size: int,
                 image_size: int, resize: int):
        self.shards, self.batch_size = shards, batch_size
        self.rank, self.world_size, self.image_size, self.resize = rank, world_size, image_size, resize

    def __iter__(self):
        worker, num_workers = worker_slot()
        total = sum(s.samples for s in self.shards)
        start, stop = equal_ranges(total, self.world_size * num_workers)[self.rank * num_workers + worker]

        def decoded():
            for key, data, label in sample_range(self.shards, start, stop):
                try:
                    yield augment.decode_center_crop(data, self.image_size, self.resize), label
                except Exception as exc:
                    raise RuntimeError(f"validation sample {key}: cannot decode ({exc})") from exc

        yield from stack_batches(decoded(), self.batch_size)


def eval_resize_for(image_size: int, eval_resize: int | None) -> int:
    return eval_resize or round(image_size * 256 / 224)


def make_loader(stream: IterableDataset, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        stream,
        batch_size=None,  # batches are formed in the workers
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,  # workers re-read the stream's epoch at each iteration
        prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers else None,
    )


class WebDatasetInput:
    """The trainer's view of the shards: training batches per epoch, validation batches."""

    def __init__(self, train: TrainStream, val: EvalStream, workers: int, pin_memory: bool):
        self.train, self.val, self.workers, self.pin_memory = train, val, workers, pin_memory

    def train_batches(self, epoch: int, start_batch: int = 0):
        self.train.set_epoch(epoch, start_batch)
        return iter(make_loader(self.train, self.workers, self.pin_memory))

    def val_batches(self):
        return iter(make_loader(self.val, self.workers, self.pin_memory))

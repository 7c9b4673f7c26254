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

Reading: each sample is one read at the offset the shard's index gives (``data_prep.tar_index``,
written at preparation, built on the fly for older shards), its tar headers checked. Images
are decoded straight into the batch (a preallocated [N, H, W, 3] buffer), and a batch travels
as uint8 [N, 3, H, W] in channels_last memory (a permuted view of that buffer): what the device
side wants, with no layout copy. A JPEG is decoded only in the region its crop needs when the
region decoder is built (``data_prep.jpeg_region``), and raw-pixel shards are not decoded at all.

Damage: a sample that cannot be read (a shard damaged after preparation, an image that does not
decode) never raises in a loader worker. It travels with its batch as a skip record (shard,
position, key, reason) and the trainer applies ``data.on_bad_sample``: stop naming it, or skip
and record it. A skipped training sample keeps its slot (label IGNORE_LABEL), so batch counts
and shapes stay equal on every rank.
"""
from __future__ import annotations

import atexit
import hashlib
import multiprocessing
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep import augment
from data_prep.manifest import PrepError, load_manifest
from data_prep.tar_index import DamagedSample, SampleReader

from .metrics import IGNORE_LABEL


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


IMAGE_FIELDS = ("jpg", "ppm")  # a JPEG, or raw RGB pixels (shards prepared with --raw-pixels)


class Sample(NamedTuple):
    key: str
    data: bytes  # the encoded image (JPEG, or a PPM of raw pixels)
    label: int
    shard: str
    index: int  # position in the shard


class Skipped(NamedTuple):
    """A sample that cannot be used, and why: it is recorded, never dropped silently."""
    shard: str
    index: int  # position in the shard
    key: str | None  # None where a damaged tar lost it
    reason: str

    def record(self, split: str) -> dict:
        return {"split": split, "shard": self.shard, "index": self.index, "key": self.key, "reason": self.reason}


class BadSampleError(RuntimeError):
    """A sample that cannot be read, where the policy is to stop; the message names it and the fix."""


def bad_sample_message(record: dict, directory: Path | str) -> str:
    where = f"sample {record['key']}" if record["key"] else f"sample #{record['index']}"
    return (f"{record['shard']}: {record['split']} {where} {record['reason']}; check the shards with "
            f"'python -m data_prep verify {directory}'")


def checked(sample: dict, shard: str, index: int, num_classes: int) -> Sample | Skipped:
    key = sample["__key__"]
    image = next((sample[field] for field in IMAGE_FIELDS if field in sample), None)
    missing = [field for field, value in (("jpg", image), ("cls", sample.get("cls"))) if value is None]
    if missing:
        return Skipped(shard, index, key, f"lacks {', '.join(missing)} (damaged shard)")
    try:
        label = int(sample["cls"])
    except ValueError:
        return Skipped(shard, index, key, f"has an unreadable label {sample['cls'][:20]!r} (damaged shard)")
    if not 0 <= label < num_classes:
        return Skipped(shard, index, key, f"has label {label}, outside 0..{num_classes - 1}")
    return Sample(key, image, label, shard, index)


def shard_range(shard: Shard, first: int, last: int, num_classes: int):
    """Samples ``first``..``last - 1`` of one shard: exactly ``last - first`` items, each a Sample
    or a Skipped. Never raises on damage. Each sample is read at its offset in the shard's index,
    so damage spoils only the samples it covers; a shard without an index (prepared by an older
    version) is indexed by walking its tar headers, and where that walk breaks the samples after
    it cannot be located, so they are recorded as unreadable."""
    try:
        reader = SampleReader(shard.url)
    except Exception as exc:  # the shard cannot be opened or walked at all
        for i in range(first, last):
            yield Skipped(shard.url, i, None, f"is unreadable: {type(exc).__name__}: {exc}")
        return
    with reader:
        for i in range(first, last):
            try:
                fields = reader.read(i, IMAGE_FIELDS + ("cls",))  # not the json metadata
            except (DamagedSample, OSError) as exc:
                yield Skipped(shard.url, i, reader.key(i), str(exc))
                continue
            fields["__key__"] = reader.key(i)
            yield checked(fields, shard.url, i, num_classes)


def sample_range(shards: list[Shard], start: int, stop: int, num_classes: int):
    """Samples ``start``..``stop - 1`` of the concatenated shards (Sample or Skipped each),
    opening only those needed."""
    offset = 0
    for shard in shards:
        first, last = max(offset, start) - offset, min(offset + shard.samples, stop) - offset
        if first < last:
            yield from shard_range(shard, first, last, num_classes)
        offset += shard.samples


def equal_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering 0..total, sizes differing by at most one."""
    bounds = [total * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def stack_batches(samples, batch_size: int):
    """Batches of (uint8 tensors stacked, int64 labels, skip records) from (tensor, label) pairs,
    where a tensor of None stands for a skipped sample and its label for its record: the slot is
    dropped (a batch may then hold no tensor, only records). For the evaluation's crop stacks;
    the trainer's streams use ``image_batches``."""
    images, labels, skipped = [], [], []

    def batch():
        stacked = torch.stack(images) if images else torch.zeros(0, dtype=torch.uint8)
        return stacked, torch.tensor(labels, dtype=torch.int64), tuple(skipped)

    taken = 0
    for image, label in samples:
        taken += 1
        if image is None:
            skipped.append(label)
        else:
            images.append(image)
            labels.append(label)
        if taken == batch_size:
            yield batch()
            images, labels, skipped, taken = [], [], [], 0
    if taken:
        yield batch()


def image_batches(samples, batch_size: int, size: int, keep_skipped: bool):
    """``stack_batches`` for HWC uint8 images (numpy [size, size, 3]), each copied once into a
    preallocated [N, size, size, 3] batch, shipped as its [N, 3, size, size] channels_last view.

    ``keep_skipped`` (training): a skipped sample keeps its slot, holding a copy of another image
    of the batch (zeros if there is none) with IGNORE_LABEL. Otherwise (validation) the slot is
    dropped: a batch of ``batch_size`` samples may then hold fewer images, or none."""
    pixels = buffer = labels = skipped = holes = None
    filled = taken = 0

    def start():
        nonlocal pixels, buffer, labels, skipped, holes, filled, taken
        pixels = torch.empty(batch_size, size, size, 3, dtype=torch.uint8)
        buffer = pixels.numpy()  # the same memory
        labels, skipped, holes, filled, taken = [], [], [], 0, 0

    def batch():
        if holes:
            real = next((i for i in range(filled) if i not in holes), None)
            for i in holes:
                buffer[i] = 0 if real is None else buffer[real]
        return pixels[:filled].permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.int64), tuple(skipped)

    start()
    for image, label in samples:
        taken += 1
        if image is None:
            skipped.append(label)
            if keep_skipped:
                holes.append(filled)
                labels.append(IGNORE_LABEL)
                filled += 1
        else:
            buffer[filled] = image
            labels.append(label)
            filled += 1
        if taken == batch_size:
            yield batch()
            start()
    if taken:
        yield batch()


def interleave(segments: list[tuple], rng: random.Random, width: int):
    """Merge ``segments``, (sample iterable, length) pairs, keeping up to ``width`` of them open
    and opening the next in order when one runs out. Each next sample comes from an open
    segment drawn with probability proportional to the samples it has left, so the open
    segments are merged in uniformly random order."""
    pending = iter(segments)
    active: list[list] = []  # [iterator, samples left]

    def refill():
        for samples, length in pending:
            if length > 0:
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
                 world_size: int, seed: int, image_size: int, crop: augment.CropSpec | None,
                 baked: bool, shuffle_buffer: int, eval_resize: int, num_classes: int,
                 photometric: augment.PhotometricSpec | None = None, interleave_shards: int = 4):
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

    def lane_samples(self, lane: int, num_lanes: int, epoch: int | None = None):
        """The Sample (or Skipped) items of lane ``lane`` of ``num_lanes`` (batches lane, lane + n, ...
        of this rank's epoch), in training order, all of them (also those before start_batch).

        The lane's contiguous range of the epoch's shard sequence is cut into per-shard segments,
        read ``interleave_shards`` at a time, then passed through the shuffle buffer."""
        epoch = self.epoch if epoch is None else epoch
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
        rng = random.Random(mix_seed(self.seed, epoch, self.rank, lane, "interleave"))
        samples = interleave(segments, rng, self.interleave_shards)
        if self.shuffle_buffer > 1:
            rng = random.Random(mix_seed(self.seed, epoch, self.rank, lane, "buffer"))
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        yield from samples

    def _decode(self, data: bytes, seed: int) -> np.ndarray:
        """The training image of one sample, uint8 [size, size, 3]."""
        size = self.image_size
        if self.baked:  # already cropped and distorted at preparation time
            return augment.center_crop_array(data, size, size)
        if self.crop is None:
            image = augment.center_crop_array(data, size, self.eval_resize)
            if self.photometric is None:
                return image
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
            distorted = augment.photometric_distort(pixels, self.photometric, torch.Generator().manual_seed(seed))
            return distorted.mul_(255).round_().to(torch.uint8).permute(1, 2, 0).numpy()
        if self.photometric is not None:
            return augment.decode_random_crop_distorted(data, size, self.crop, random.Random(seed), self.photometric,
                                                        torch.Generator().manual_seed(seed)).permute(1, 2, 0).numpy()
        return augment.random_crop_array(data, size, self.crop, random.Random(seed))

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

        def decoded():
            for i, item in enumerate(self.lane_samples(lane, num_workers, epoch)):
                if i < skip * self.batch_size:
                    continue  # resumed mid-epoch: these batches were already trained on
                yield decode_or_skip(item, lambda data: self._decode(data, base + i), "train")

        yield from image_batches(decoded(), self.batch_size, self.image_size, keep_skipped=True)


def decode_or_skip(item: Sample | Skipped, decode, split: str) -> tuple[np.ndarray | None, int | dict]:
    """(image, label), or (None, skip record) for a sample that cannot be read or decoded."""
    if isinstance(item, Skipped):
        return None, item.record(split)
    try:
        return decode(item.data), item.label
    except Exception as exc:  # any decoder failure (corrupt data, a decompression bomb) is this sample's
        return None, Skipped(item.shard, item.index, item.key, f"does not decode ({type(exc).__name__}: {exc})").record(split)


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
        decode = lambda data: augment.center_crop_array(data, self.image_size, self.resize)  # noqa: E731
        decoded = (decode_or_skip(item, decode, "val") for item in items)
        yield from image_batches(decoded, self.batch_size, self.image_size, keep_skipped=False)


def eval_resize_for(image_size: int, eval_resize: int | None) -> int:
    return eval_resize or round(image_size * 256 / 224)


def ignore_sigterm(worker_id: int) -> None:
    """SIGTERM reaches the whole process group (SLURM, torch's launcher): the training process
    checkpoints and stops at the next step, but a loader worker killed by it would crash the
    training process first. Workers still end with it (they watch their parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register
def kill_leftover_workers() -> None:
    """multiprocessing stops daemonic children at exit with SIGTERM, which loader workers now
    ignore: those still running (their loader kept alive by an exception's traceback) would be
    waited for forever. Runs before multiprocessing's own exit hook (atexit is last in, first out)."""
    leftover = [child for child in multiprocessing.active_children() if child.daemon]
    if leftover:
        # The loader's SIGCHLD handler would report the kill as a worker failure, with a traceback.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in leftover:
            child.kill()


def make_loader(stream: IterableDataset, workers: int, pin_memory: bool, persistent: bool = False) -> DataLoader:
    """``persistent``: the workers outlive an iteration (a TrainStream's workers then go on with
    the next epoch by themselves); otherwise they are forked anew, with the stream's epoch."""
    return DataLoader(
        stream,
        batch_size=None,  # batches are formed in the workers
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers else None,
        worker_init_fn=ignore_sigterm if workers else None,
    )


class WebDatasetInput:
    """The trainer's view of the shards: training batches per epoch, validation batches.

    The training workers persist from epoch to epoch (no fork and start-up per epoch): each
    worker computes the next epoch's plan itself. A resumed epoch (``start_batch`` > 0), or an
    epoch other than the next, starts fresh workers from that point."""

    def __init__(self, train: TrainStream, val: EvalStream, workers: int, pin_memory: bool):
        self.train, self.val, self.workers, self.pin_memory = train, val, workers, pin_memory
        self.train_loader, self.next_epoch = None, None

    def train_batches(self, epoch: int, start_batch: int = 0):
        self.train.set_epoch(epoch, start_batch)
        if self.train_loader is None or (epoch, start_batch) != (self.next_epoch, 0):
            self.train_loader = make_loader(self.train, self.workers, self.pin_memory, persistent=True)
        self.next_epoch = epoch + 1
        return iter(self.train_loader)

    def val_batches(self):
        return iter(make_loader(self.val, self.workers, self.pin_memory))

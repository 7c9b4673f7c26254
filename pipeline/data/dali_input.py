"""DALI input: the shards' images decoded, cropped and resized by NVIDIA DALI, on the GPU (nvJPEG,
``mixed`` decoders, the hardware JPEG decoder where the GPU has one) or, without CUDA, by the
same pipeline on DALI's CPU operators (``device_id=None``).

The project's shard reader feeds DALI (``fn.external_source``), rather than DALI's own
WebDataset reader, so that this loader keeps every guarantee of the shard loader by using its
code: loader worker processes read the samples exactly as ``webdataset_input.TrainStream``
does (the same samples per rank and epoch, the same order, lanes and shuffle, exact resume at
``start_batch``), parse each image's header and draw its crop on the host with the shard
loader's own sampler and seeds (``imaging.crops.sample_crop`` with ``random.Random`` seeded from
(seed, epoch, rank, lane, sample)): for the same worker count, a sample gets exactly the box,
interpolation and flip the shard loader would give it. Each batch then travels to the training
process as encoded bytes plus per-sample geometry (``EncodedBatch``), where DALI decodes only
the crop's region (``fn.decoders.image_slice``; ``region=False``: the whole image, then the box
cropped by the resize) and resizes it with the drawn filter (``fn.resize``; a mirrored box
flips). Out come uint8 [N, 3, S, S] batches (channels_last views of DALI's HWC output), on the
training device: the photometric distortion and normalisation are ``device_augment``'s, as for
every loader.

Filters: DALI's antialiased linear and cubic filters are Pillow's bilinear and bicubic; nearest
is nearest; Pillow's area (box) filter has no DALI twin and is approximated by a Gaussian when
shrinking and nearest when enlarging (docs/input-pipeline.md gives the pixel differences).

Damage: a sample the shard reader cannot read, or whose header does not parse, is a skip record
before DALI sees it. An image DALI fails to decode ends that pipeline (DALI cannot go on after
an operator error): the batches in flight are then decoded again on a fresh pipeline, each
sample of a failing batch alone to find which ones fail, and those are skipped and recorded
like any other (a training slot keeps a copy of another image of its batch, labelled
IGNORE_LABEL; a validation sample is left out), so nothing is lost unrecorded.

Validation: each (rank, worker) slot reads its own contiguous range of the samples, as the
shard loader's ``EvalStream``: every sample once across ranks, the last batch short.
"""
from __future__ import annotations

import functools
import io
import itertools
import math
import random
import weakref
from collections import deque
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset

from imaging.crops import center_box, sample_crop
from imaging.decode import EncodedImage
from imaging.specs import INTERPOLATIONS
from pipeline.config import ConfigError

from .batches import make_loader, worker_context
from .prepared import IGNORE_LABEL, Shard, Skipped, equal_ranges, mix_seed, sample_range, worker_slot
from .webdataset_input import TrainStream

DALI_INSTALL_HINT = "pip install -e '.[dali]' (or bash scripts/setup.sh --dali)"
# DALI's (shrinking, enlarging) filters for each of the project's interpolations, by DALIInterpType name.
DALI_FILTERS = {
    "bilinear": ("INTERP_LINEAR", "INTERP_LINEAR"),  # antialiased when shrinking, as Pillow's
    "bicubic": ("INTERP_CUBIC", "INTERP_CUBIC"),
    "nearest": ("INTERP_NN", "INTERP_NN"),
    "area": ("INTERP_GAUSSIAN", "INTERP_NN"),  # Pillow's box filter: the closest DALI has (measured)
}
PREFETCH = 2  # batches DALI works on ahead of the one the trainer takes


def require_dali() -> None:
    """NVIDIA DALI can be imported, else a ConfigError naming the extra that installs it."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise ConfigError(f"data.loader: dali needs NVIDIA DALI (the Python package nvidia-dali), which is not "
                          f"installed: {DALI_INSTALL_HINT}") from None


# ----------------------------------------------------------------------------------------- host side
class Planned(NamedTuple):
    """One sample as DALI gets it: the encoded image, the region to decode and the crop in it."""
    data: bytes
    region: tuple[int, int, int, int]  # x, y, width, height in the image
    roi: tuple[float, float, float, float]  # y0, x0, y1, x1 of the crop in the region; x0 > x1: mirrored
    interpolation: int  # index into INTERPOLATIONS
    source: tuple = ("", 0, None)  # shard, position, key: what a skip record names


def plan(data: bytes, box: tuple[float, float, float, float], interpolation: str, flip: bool,
         width: int, height: int) -> Planned:
    """The whole-pixel region that holds ``box`` (x0, y0, x1, y1 in the image), and the box in it."""
    x, y = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    right, bottom = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    x0, y0, x1, y1 = box[0] - x, box[1] - y, box[2] - x, box[3] - y
    if flip:
        x0, x1 = x1, x0
    return Planned(data, (x, y, right - x, bottom - y), (y0, x0, y1, x1), INTERPOLATIONS.index(interpolation))


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header: the C library's parser for JPEGs, raw pixels' own header,
    else Pillow's (it reads the header only; it raises for data it cannot identify)."""
    encoded = EncodedImage.open(data)
    if encoded is not None:
        return encoded.width, encoded.height
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def plan_or_skip(item, geometry, split: str) -> tuple[Planned | None, int | dict]:
    """(plan, label), or (None, skip record) for a sample that cannot be read or whose header
    does not parse. ``geometry(data, width, height)`` gives its plan."""
    if isinstance(item, Skipped):
        return None, item.record(split)
    try:
        width, height = image_size(item.data)
        return geometry(item.data, width, height)._replace(source=(item.shard, item.index, item.key)), item.label
    except Exception as exc:  # any parser failure (not an image, a decompression bomb) is this sample's
        return None, Skipped(item.shard, item.index, item.key,
                             f"does not decode ({type(exc).__name__}: {exc})").record(split)


@functools.lru_cache(maxsize=1)
def placeholder() -> Planned:
    """A tiny grey JPEG for the slots of a training batch none of whose samples could be read."""
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(out, "JPEG")
    return plan(out.getvalue(), (0, 0, 8, 8), "bilinear", False, 8, 8)


class EncodedBatch(NamedTuple):
    """A batch as loader workers hand it over (tensors: shared memory, no pickling of the bytes)."""
    data: torch.Tensor  # uint8: the encoded images end to end
    offsets: torch.Tensor  # int64 [n + 1]: image i is data[offsets[i]:offsets[i + 1]]
    regions: torch.Tensor  # int32 [n, 4]: Planned.region
    rois: torch.Tensor  # float32 [n, 4]: Planned.roi
    interpolations: torch.Tensor  # int32 [n]
    labels: torch.Tensor  # int64 [n]; IGNORE_LABEL: a skipped sample's slot
    skipped: tuple  # skip records
    sources: tuple  # Planned.source of each sample

    @classmethod
    def of(cls, samples: list[tuple[Planned, int]], skipped) -> "EncodedBatch":
        data = b"".join(p.data for p, _ in samples)
        offsets = np.cumsum([0] + [len(p.data) for p, _ in samples])
        return cls(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8),
                   torch.from_numpy(offsets.astype(np.int64)),
                   torch.tensor([p.region for p, _ in samples], dtype=torch.int32).reshape(-1, 4),
                   torch.tensor([p.roi for p, _ in samples], dtype=torch.float32).reshape(-1, 4),
                   torch.tensor([p.interpolation for p, _ in samples], dtype=torch.int32),
                   torch.tensor([label for _, label in samples], dtype=torch.int64), tuple(skipped),
                   tuple(p.source for p, _ in samples))

    @property
    def size(self) -> int:
        return len(self.labels)

    def sample(self, i: int) -> Planned:
        start, stop = self.offsets[i].item(), self.offsets[i + 1].item()
        return Planned(self.data[start:stop].numpy().tobytes(), tuple(self.regions[i].tolist()),
                       tuple(self.rois[i].tolist()), int(self.interpolations[i]), self.sources[i])

    def without(self, failed: dict[int, str], keep_slots: bool) -> "EncodedBatch":
        """This batch with the samples ``failed`` (position -> reason) skipped and recorded:
        their slots hold a copy of another sample, labelled IGNORE_LABEL (``keep_slots``), or are
        dropped. A failed slot that was already a copy (IGNORE_LABEL) is not recorded again."""
        records = [*self.skipped]
        kept = []
        for i in range(self.size):
            if i in failed:
                if int(self.labels[i]) != IGNORE_LABEL:
                    records.append(Skipped(*self.sources[i], failed[i]).record("train" if keep_slots else "val"))
            else:
                kept.append((self.sample(i), int(self.labels[i])))
        if keep_slots:
            fill = next((p for p, label in kept if label != IGNORE_LABEL), kept[0][0] if kept else placeholder())
            slots = iter(kept)
            kept = [(fill, IGNORE_LABEL) if i in failed else next(slots) for i in range(self.size)]
        return EncodedBatch.of(kept, records)


def encoded_batches(entries, batch_size: int, keep_slots: bool):
    """EncodedBatches of ``batch_size`` (plan, label) / (None, record) entries; the last may be
    short. ``keep_slots`` (training): a skipped sample keeps its slot, holding a copy of another
    sample of the batch labelled IGNORE_LABEL; otherwise (validation) it is left out."""
    for chunk in iter(lambda: list(itertools.islice(entries, batch_size)), []):
        planned = [(p, label) for p, label in chunk if p is not None]
        records = [label for p, label in chunk if p is None]
        if keep_slots and records:
            fill = planned[0][0] if planned else placeholder()
            planned = [(p, label) if p is not None else (fill, IGNORE_LABEL) for p, label in chunk]
        yield EncodedBatch.of(planned, records)


class EncodedTrainStream(IterableDataset):
    """``TrainStream``'s samples, batches and resume, with crops drawn but not decoded."""

    def __init__(self, stream: TrainStream):
        self.stream = stream

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.stream.set_epoch(epoch, start_batch)

    def geometry(self, data: bytes, width: int, height: int, seed: int) -> Planned:
        """The shard loader's crop of this sample (``TrainStream.decode``), as a plan."""
        s = self.stream
        if s.baked:  # already cropped at preparation time
            return plan(data, center_box(width, height, s.image_size, s.image_size), "bilinear", False, width, height)
        if s.crop is None:
            return plan(data, center_box(width, height, s.image_size, s.eval_resize), "bilinear", False, width, height)
        c = sample_crop(width, height, s.crop, random.Random(seed))
        return plan(data, (c.left, c.top, c.left + c.width, c.top + c.height), c.interpolation, c.flip, width, height)

    def __iter__(self):
        s = self.stream
        # As TrainStream.__iter__: the DataLoader takes workers in turn, so lane l (batches l,
        # l + n, ...) is served by the worker whose turn batch l is, rotated after a resume.
        worker, num_workers = worker_slot()
        epoch, start_batch = s.epoch, s.start_batch
        s.epoch, s.start_batch = epoch + 1, 0  # a persistent worker's next iteration: the next epoch
        lane = (worker + start_batch) % num_workers
        skip = len(range(lane, min(start_batch, s.batches_per_epoch), num_workers)) * s.batch_size
        base = mix_seed(s.seed, epoch, s.rank, lane, "augment")

        def planned():
            for i, item in enumerate(s.lane_samples(lane, num_workers, epoch)):
                if i >= skip:  # resumed mid-epoch: the batches before were already trained on
                    yield plan_or_skip(item, lambda data, w, h: self.geometry(data, w, h, base + i), "train")

        yield from encoded_batches(planned(), s.batch_size, keep_slots=True)


class EncodedEvalStream(IterableDataset):
    """Each validation sample once, in one (rank, worker) slot, planned as the evaluation
    transform (shorter side to ``resize``, centre crop); the last batch may be short."""

    def __init__(self, shards: list[Shard], *, batch_size: int, rank: int, world_size: int, image_size: int,
                 resize: int, num_classes: int):
        self.shards, self.batch_size, self.num_classes = shards, batch_size, num_classes
        self.rank, self.world_size, self.image_size, self.resize = rank, world_size, image_size, resize

    def geometry(self, data: bytes, width: int, height: int) -> Planned:
        return plan(data, center_box(width, height, self.image_size, self.resize), "bilinear", False, width, height)

    def __iter__(self):
        worker, num_workers = worker_slot()
        total = sum(s.samples for s in self.shards)
        start, stop = equal_ranges(total, self.world_size * num_workers)[self.rank * num_workers + worker]
        items = sample_range(self.shards, start, stop, self.num_classes)
        yield from encoded_batches((plan_or_skip(item, self.geometry, "val") for item in items), self.batch_size,
                                   keep_slots=False)


# ----------------------------------------------------------------------------------------- DALI side
class DecodeFailed(Exception):
    """DALI stopped on an operator error; its pipeline is gone."""


def dali_reason(error: Exception) -> str:
    """The line of a DALI error that says what went wrong (its messages also hold a traceback)."""
    text = str(error)
    after = text.split("encountered:", 1)[-1]
    line = next((line.strip() for line in after.splitlines() if line.strip()), text.strip())
    return line[:200]


class WeakSource:
    """DALI's source callback: ``DaliDecoder.next_input`` of a decoder held weakly."""

    def __init__(self, decoder: "DaliDecoder"):
        self.decoder = weakref.ref(decoder)

    def __call__(self) -> tuple:
        return self.decoder().next_input()


class DaliDecoder:
    """One DALI pipeline: EncodedBatches in, uint8 [N, size, size, 3] crops out, on ``device``.

    ``decode(batches)`` keeps up to ``PREFETCH`` batches in DALI's queue (fed by the source
    callback, which takes them from ``batches`` as DALI asks); a batch with no image (all of its
    validation samples skipped) is passed through without DALI."""

    def __init__(self, batch_size: int, size: int, device: torch.device, threads: int, hw_decoder_load: float,
                 region: bool = True):
        self.batch_size, self.size, self.device = batch_size, size, torch.device(device)
        self.threads, self.hw_decoder_load, self.region = max(1, threads), hw_decoder_load, region
        self.pipe = None
        self.feed, self.in_flight, self.exhausted = iter(()), deque(), True
        self.filter_codes = None

    def build(self):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        self.filter_codes = np.array([[int(getattr(types.DALIInterpType, name)) for name in DALI_FILTERS[i]]
                                      for i in INTERPOLATIONS], dtype=np.int32)
        cuda = self.device.type == "cuda"
        pipe = Pipeline(batch_size=self.batch_size, num_threads=self.threads,
                        device_id=(self.device.index or 0) if cuda else None, prefetch_queue_depth=PREFETCH)
        # The pipeline holds its decoder weakly: in a reference cycle, the loader's worker processes
        # (which the decoder's feed holds) would be stopped by the garbage collector, each after
        # a 5 s timeout, as it finalises their queues first.
        source = WeakSource(self)
        with pipe:
            decoder = dict(device="mixed" if cuda else "cpu", output_type=types.RGB, adjust_orientation=False)
            if cuda:
                decoder["hw_decoder_load"] = self.hw_decoder_load
            if self.region:
                data, anchors, shapes, starts, ends, shrink, enlarge = fn.external_source(
                    source=source, num_outputs=7, batch=True,
                    dtype=[types.UINT8, types.INT32, types.INT32, types.FLOAT, types.FLOAT, types.INT32, types.INT32])
                images = fn.decoders.image_slice(data, anchors, shapes, axis_names="WH", **decoder)
            else:
                data, starts, ends, shrink, enlarge = fn.external_source(
                    source=source, num_outputs=5, batch=True,
                    dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.INT32])
                images = fn.decoders.image(data, **decoder)
            images = fn.resize(images, size=[self.size, self.size], roi_start=starts, roi_end=ends,
                               roi_relative=False, min_filter=fn.cast(shrink, dtype=types.INTERP_TYPE),
                               mag_filter=fn.cast(enlarge, dtype=types.INTERP_TYPE), antialias=True)
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def next_input(self):
        """DALI's source callback: the next batch that holds images, as DALI's inputs."""
        while True:
            try:
                batch = next(self.feed)
            except StopIteration:
                self.exhausted = True
                raise
            self.in_flight.append(batch)
            if batch.size:
                return self.inputs(batch)

    def inputs(self, batch: EncodedBatch) -> tuple:
        data, offsets = batch.data.numpy(), batch.offsets.tolist()
        images = [data[offsets[i]:offsets[i + 1]] for i in range(batch.size)]
        regions, rois = batch.regions.numpy(), batch.rois.numpy()
        codes = self.filter_codes[batch.interpolations.numpy()]
        shrink, enlarge = np.ascontiguousarray(codes[:, 0]), np.ascontiguousarray(codes[:, 1])
        if not self.region:  # the crop in the whole image
            rois = rois + regions[:, [1, 0, 1, 0]].astype(np.float32)
            return images, np.ascontiguousarray(rois[:, :2]), np.ascontiguousarray(rois[:, 2:]), shrink, enlarge
        return (images, regions[:, :2].copy(), regions[:, 2:].copy(), np.ascontiguousarray(rois[:, :2]),
                np.ascontiguousarray(rois[:, 2:]), shrink, enlarge)

    def start(self, batches) -> None:
        """A new pass over ``batches``: the pipeline reset (rebuilt where the last pass was left
        unfinished or failed) and its queue filled."""
        if self.pipe is None or self.in_flight or not self.exhausted:
            self.pipe = None  # destroyed before its successor starts its threads
            self.pipe = self.build()
        else:
            self.pipe.reset()
        self.feed, self.in_flight, self.exhausted = iter(batches), deque(), False
        self.pipe.schedule_run()

    def outputs(self) -> torch.Tensor:
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        try:
            (images,) = self.pipe.outputs(stream) if stream is not None else self.pipe.outputs()
        except RuntimeError as exc:
            self.pipe = None
            raise DecodeFailed(dali_reason(exc)) from exc
        return torch.from_dlpack(images.as_tensor())

    def decode(self, batches, keep_slots: bool):
        """(batch, images) for each of ``batches``, in order; images None for a batch without any.
        Samples DALI fails on are skipped and recorded (``EncodedBatch.without``)."""
        self.start(batches)
        while self.in_flight:
            batch = self.in_flight[0]
            if not batch.size:
                self.in_flight.popleft()
                yield batch, None
                continue
            try:
                images = self.outputs()
            except DecodeFailed:
                failed, self.in_flight = list(self.in_flight), deque()
                rest = self.feed
                for batch in failed:
                    yield self.decode_checked(batch, keep_slots)
                self.start(rest)  # the batches not yet taken, on a fresh pipeline
                continue
            self.in_flight.popleft()
            self.pipe.schedule_run()  # the next batch is decoded while this one trains
            yield batch, images

    def decode_alone(self, batch: EncodedBatch) -> tuple[torch.Tensor | None, str]:
        """(images, "") for one batch on its own, or (None, DALI's reason) where DALI fails on it."""
        if not batch.size:
            return None, ""
        self.start([batch])
        try:
            images = self.outputs()
        except DecodeFailed as failure:
            return None, str(failure)
        self.in_flight.clear()
        return images, ""

    def decode_checked(self, batch: EncodedBatch, keep_slots: bool) -> tuple[EncodedBatch, torch.Tensor | None]:
        """A batch that ended a pipeline: decoded again, and where it fails, each of its samples
        alone; those DALI fails on are skipped and recorded, the rest decoded."""
        images, reason = self.decode_alone(batch)
        if images is not None or not batch.size:
            return batch, images
        failed = {}
        for i in range(batch.size):
            single = EncodedBatch.of([(batch.sample(i), int(batch.labels[i]))], ())
            alone, why = self.decode_alone(single)
            if alone is None:
                failed[i] = f"does not decode (DALI: {why})"
        known_good = EncodedBatch.of([(placeholder(), 0)], ())
        if not failed or (len(failed) == batch.size and self.decode_alone(known_good)[0] is None):
            # Not the samples' fault: none fails alone, or DALI fails on a known good image too.
            raise RuntimeError(f"DALI failed on a batch ({reason}) and on {len(failed)} of its {batch.size} "
                               f"samples alone")
        checked = batch.without(failed, keep_slots)
        images, reason = self.decode_alone(checked)
        if images is None and checked.size:
            raise RuntimeError(f"DALI failed on a batch without the samples it failed on alone ({reason})")
        return checked, images


class DaliInput:
    """The trainer's view of the shards through DALI: ``train_batches``, ``val_batches``.

    ``train`` (a ``TrainStream``) and the validation shards are read by ``workers`` loader
    processes (persistent, as the shard loader's), which hand over encoded batches; DALI decodes
    them with ``workers`` threads (at least one)."""

    def __init__(self, train: TrainStream, val: list[Shard], *, eval_batch_size: int, eval_resize: int, workers: int,
                 device: torch.device | str, hw_decoder_load: float = 0.0, region: bool = True):
        require_dali()
        self.train = EncodedTrainStream(train)
        self.val = EncodedEvalStream(val, batch_size=eval_batch_size, rank=train.rank, world_size=train.world_size,
                                     image_size=train.image_size, resize=eval_resize, num_classes=train.num_classes)
        self.workers, self.device = workers, torch.device(device)
        self.hw_decoder_load, self.region = hw_decoder_load, region
        self.train_decoder, self.val_decoder = (
            DaliDecoder(batch, train.image_size, self.device, workers, hw_decoder_load, region)
            for batch in (train.batch_size, eval_batch_size))
        self.train_loader, self.next_epoch, self.val_loader = None, None, None
        if workers:
            worker_context()

    def describe(self) -> str:
        where = (f"on {self.device} (nvJPEG; hardware decoder load {self.hw_decoder_load:g})"
                 if self.device.type == "cuda" else "on DALI's CPU operators")
        feeders = f"{self.workers} loader workers" if self.workers else "the training process"
        return (f"data.loader=dali: decoding {'each crop region' if self.region else 'whole images'} {where} with "
                f"{max(1, self.workers)} threads, the shards read by {feeders}")

    def train_batches(self, epoch: int, start_batch: int = 0):
        stream = self.train.stream
        self.train.set_epoch(epoch, start_batch)
        if self.train_loader is None or (epoch, start_batch) != (self.next_epoch, 0):
            self.train_loader = make_loader(self.train, self.workers, pin_memory=False, persistent=True)
        self.next_epoch = epoch + 1
        # Exactly the epoch's batches: the source then ends as the last one is taken (no pass left open).
        batches = itertools.islice(iter(self.train_loader), max(0, stream.batches_per_epoch - start_batch))
        for batch, images in self.train_decoder.decode(batches, keep_slots=True):
            yield images.permute(0, 3, 1, 2), batch.labels, batch.skipped

    def val_batches(self):
        if self.val_loader is None:
            self.val_loader = make_loader(self.val, self.workers, pin_memory=False, persistent=True)
        size = self.val.image_size
        for batch, images in self.val_decoder.decode(iter(self.val_loader), keep_slots=False):
            if images is None:
                images = torch.zeros(0, size, size, 3, dtype=torch.uint8, device=self.device)
            yield images.permute(0, 3, 1, 2), batch.labels, batch.skipped

"""Loader workers and the batches they build: samples in, uint8 batches (and skip records) out.

Images are decoded straight into the batch (a preallocated [N, H, W, 3] buffer), and a batch
travels as uint8 [N, 3, H, W] in channels_last memory (a permuted view of that buffer): what the
device side wants, with no layout copy. A skipped training sample keeps its slot (label
IGNORE_LABEL), so batch counts and shapes stay equal on every rank.
"""
from __future__ import annotations

import atexit
import multiprocessing
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from .prepared import IGNORE_LABEL, Sample, Skipped


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


def decode_or_skip(item: Sample | Skipped, decode, split: str) -> tuple[np.ndarray | None, int | dict]:
    """(image, label), or (None, skip record) for a sample that cannot be read or decoded."""
    if isinstance(item, Skipped):
        return None, item.record(split)
    try:
        return decode(item.data), item.label
    except Exception as exc:  # any decoder failure (corrupt data, a decompression bomb) is this sample's
        return None, Skipped(item.shard, item.index, item.key, f"does not decode ({type(exc).__name__}: {exc})").record(split)


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

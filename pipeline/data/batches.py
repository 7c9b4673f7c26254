"""Loader workers and the batches they build: samples in, uint8 batches (and skip records) out.

Images are decoded straight into the batch (a preallocated [N, H, W, 3] buffer), and a batch
travels as uint8 [N, 3, H, W] in channels_last memory (a permuted view of that buffer): what the
device side wants, with no layout copy. A skipped training sample keeps its slot (label
IGNORE_LABEL), so batch counts and shapes stay equal on every rank.
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.pool
import multiprocessing.resource_tracker
import os
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


# Imported once by the fork server, so that every loader worker starts with them.
WORKER_PRELOAD = ["torch", "numpy", "PIL.Image", "webdataset", "pipeline.data.webdataset_input"]


def worker_context() -> multiprocessing.context.BaseContext:
    """Where loader workers come from: a fork server, a process that runs no other thread. A
    worker forked from the training process would inherit every lock that one of its other
    threads (the trackers', the run lock's heartbeat, the stall watch, fsspec's event loop)
    held at that moment (an import, stdio, a logging handler) and wait for it forever.

    The server is started once per process (again if it died), by fork and exec, with SIGTERM
    blocked, which the workers it forks inherit: SIGTERM to the process group must end neither
    (a worker whose parent, the server, ends takes it for the end of the training process)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)  # read when the server starts
    # The server starts the resource tracker first, which unblocks SIGTERM after starting it.
    multiprocessing.resource_tracker.ensure_running()
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)
    return context


def inherit_environment(environ: dict[str, str]) -> None:
    """A process of the fork server starts with the server's environment, as it was when the
    server started: take that of the process that starts it, as it is now, as a fork would
    (variables set since: a test's AWS_*, the credentials sharer's socket)."""
    if os.environ != environ:
        os.environ.clear()
        os.environ.update(environ)


def start_worker(environ: dict[str, str], worker_id: int) -> None:
    """A loader worker's first call. SIGTERM reaches the whole process group (SLURM, torch's
    launcher): the training process checkpoints and stops at the next step, but a loader worker
    killed by it would crash the training process first. Workers still end with it (their
    parent, the fork server, does). (Already blocked where ``worker_context`` started the
    server; not where another did.)"""
    inherit_environment(environ)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def start_pool_process(environ: dict[str, str]) -> None:
    """A ``worker_pool`` process's first call: ``Pool.terminate`` ends them with SIGTERM, and waits."""
    inherit_environment(environ)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def worker_pool(processes: int) -> multiprocessing.pool.Pool:
    """A Pool of processes of ``worker_context``'s fork server."""
    return worker_context().Pool(processes, initializer=start_pool_process, initargs=(dict(os.environ),))


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
    the next epoch by themselves); otherwise they are started anew, with the stream's epoch.
    Workers start from ``worker_context``'s fork server, each with its own unpickled copy of
    ``stream`` and this process's environment: they see the module state of a fresh import,
    not this process's."""
    return DataLoader(
        stream,
        batch_size=None,  # batches are formed in the workers
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers else None,
        multiprocessing_context=worker_context() if workers else None,
        worker_init_fn=functools.partial(start_worker, dict(os.environ)) if workers else None,
    )

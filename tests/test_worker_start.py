"""How loader workers start: from a fork server, never by forking the training process, whose
other threads (the trackers', the run lock's heartbeat, the stall watch, fsspec's event loop)
may hold a lock at that moment, which would stay held in the worker forever. Checked through
the trainer's own input (``WebDatasetInput``: training and validation loaders) on tiny shards."""
from __future__ import annotations

import importlib
import multiprocessing
import os
import signal
import sys
import threading

import pytest
from torch.utils.data import IterableDataset

from pipeline.data.batches import make_loader, worker_context, worker_pool
from pipeline.data.prepared import open_prepared
from pipeline.data.webdataset_input import EvalStream, TrainStream, WebDatasetInput

# Far beyond the first batch of tiny shards from a fresh worker, even on a slow, busy machine;
# a worker that waits on a lock nobody will release never gets there.
FIRST_BATCH_BOUND_S = 120
BATCHES_PER_EPOCH = 6

HALF_IMPORTED = """
import os, pathlib, time
if os.getpid() == {pid}:  # the training process: this import stays open until the test lets it end
    while not pathlib.Path({release!r}).exists():
        time.sleep(0.01)
"""


class ImportingFirst(IterableDataset):
    """The trainer's stream, whose workers first import ``module``, as a worker does when it
    first uses a library that is imported lazily (PIL's plugins, a store's client)."""

    def __init__(self, stream, module: str):
        self.stream, self.module = stream, module

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.stream.set_epoch(epoch, start_batch)

    def __iter__(self):
        importlib.import_module(self.module)
        yield from self.stream


class EnvironmentFirst(IterableDataset):
    """The trainer's stream, after the value of the variable ``name`` in the worker's environment."""

    def __init__(self, stream, name: str):
        self.stream, self.name = stream, name

    def __iter__(self):
        yield os.environ.get(self.name)
        yield from self.stream


def trainer_input(data, module: str | None = None) -> WebDatasetInput:
    train = TrainStream(data.train, batch_size=4, batches_per_epoch=BATCHES_PER_EPOCH, rank=0, world_size=1, seed=0,
                        image_size=32, crop=None, baked=False, shuffle_buffer=0, eval_resize=36,
                        num_classes=data.num_classes)
    val = EvalStream(data.val, batch_size=3, rank=0, world_size=1, image_size=32, resize=36,
                     num_classes=data.num_classes)
    if module is not None:
        train, val = ImportingFirst(train, module), ImportingFirst(val, module)
    return WebDatasetInput(train, val, workers=2, pin_memory=False)


def first_batch(batches, bound_s: float):
    """The first batch, or None when none came within ``bound_s``."""
    got = []
    taker = threading.Thread(target=lambda: got.append(next(batches)), daemon=True)
    taker.start()
    taker.join(bound_s)
    return got[0] if got else None


@pytest.fixture
def new_workers():
    """The loader worker processes started during the test; killed at its end if still there
    (a hung worker would otherwise outlive the test)."""
    before = set(multiprocessing.active_children())
    started = lambda: [p for p in multiprocessing.active_children() if p not in before]  # noqa: E731
    yield started
    left = started()
    if left:  # hung: killed without the loader's SIGCHLD handler taking it for a worker failure
        handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for process in left:
            process.kill()
            process.join()
        signal.signal(signal.SIGCHLD, handler)


def test_a_module_half_imported_by_another_thread_does_not_hang_the_workers(tiny_data, tmp_path, monkeypatch,
                                                                           new_workers):
    """Another thread of the training process is importing a module (as the trackers' thread
    imports mlflow) while the loaders start their workers; the workers import it too. A worker
    forked at that moment inherits the module half-imported, with its import lock held by a
    thread that does not exist in the worker, and waits forever. Training and validation
    workers get their batches, and validation keeps its workers from one epoch to the next."""
    module = "half_imported_while_workers_start"
    release = tmp_path / "release"
    (tmp_path / f"{module}.py").write_text(HALF_IMPORTED.format(pid=os.getpid(), release=str(release)))
    monkeypatch.syspath_prepend(str(tmp_path))
    importer = threading.Thread(target=importlib.import_module, args=(module,), daemon=True)
    importer.start()
    try:
        while module not in sys.modules:  # its import has begun (and waits for `release`)
            importer.join(0.01)
        loader_input = trainer_input(open_prepared(tiny_data), module)
        train = loader_input.train_batches(0)
        val = loader_input.val_batches()  # both loaders' workers start while the import is open
    finally:
        release.touch()
        importer.join()
    assert first_batch(train, FIRST_BATCH_BOUND_S) is not None, "a training worker is stuck"
    assert first_batch(val, FIRST_BATCH_BOUND_S) is not None, "a validation worker is stuck"
    assert len(list(train)) == BATCHES_PER_EPOCH - 1
    list(val)
    workers = new_workers()
    assert len(workers) == 4  # two training and two validation workers
    assert sum(len(y) for _, y, _ in loader_input.val_batches()) == open_prepared(tiny_data).val_samples
    assert new_workers() == workers  # the next validation uses the same workers: none started


def test_sigterm_to_the_process_group_leaves_the_workers_and_their_fork_server(tiny_data, new_workers):
    """SLURM and torch's launcher send SIGTERM to the whole process group, and the trainer
    stops at its next step after a checkpoint: until then its loader must go on. The workers
    ignore SIGTERM, and so does the fork server they were started from (a worker whose parent
    ends takes it as the end of the training process and quits)."""
    loader_input = trainer_input(open_prepared(tiny_data))
    train = loader_input.train_batches(0)
    assert first_batch(train, FIRST_BATCH_BOUND_S) is not None
    workers = new_workers()
    parents = {int(open(f"/proc/{w.pid}/stat").read().rsplit(")", 1)[1].split()[1]) for w in workers}
    assert os.getpid() not in parents  # not forked from this process
    for pid in {w.pid for w in workers} | parents:
        os.kill(pid, signal.SIGTERM)
    assert len(list(train)) == BATCHES_PER_EPOCH - 1
    assert len(list(loader_input.train_batches(1))) == BATCHES_PER_EPOCH
    assert all(w.is_alive() for w in workers) and new_workers() == workers


def test_workers_see_the_environment_as_it_is_when_their_loader_starts(tiny_data, monkeypatch):
    """The fork server keeps the environment it started with; its processes take the training
    process's as it is when they start, as forked ones would (AWS_* set since, say)."""
    worker_context()  # running before the variable is set
    monkeypatch.setenv("WORKER_START_PROBE", "set after the fork server started")
    data = open_prepared(tiny_data)
    val = EvalStream(data.val, batch_size=3, rank=0, world_size=1, image_size=32, resize=36,
                     num_classes=data.num_classes)
    assert next(iter(make_loader(EnvironmentFirst(val, "WORKER_START_PROBE"), 1, pin_memory=False))) == \
        "set after the fork server started"
    with worker_pool(1) as pool:  # the in-memory loader's decoding processes
        assert pool.apply(os.getenv, ("WORKER_START_PROBE",)) == "set after the fork server started"

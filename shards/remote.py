"""Samples of shards in an object store: few large ranged reads, prefetched, through a cache.

A loader lane reads a contiguous range of samples of a shard (``pipeline.data.prepared``
cuts the ranges). Their byte ranges are contiguous too, so the range is fetched in reads of
up to ``chunk_bytes`` cut at sample boundaries (``plan_reads``), ``PREFETCH`` reads ahead of
the one being decoded, through one thread pool per process that bounds the requests in
flight. A range sends nothing until it is started (``StreamedRange``): a lane starts only the
segments it reads at once. Each sample's members are then cut from the chunk and their tar
headers checked, as for a local shard: damage spoils only the samples it covers.

The optional cache (``ShardCache``) holds whole shards on local disk, named by the sha256 the
manifest gives: the first reader of a shard on a node downloads all of it (verifying size and
checksum) while others stream, and later epochs read the local copy. A re-prepared shard has
another checksum, hence another name: a stale copy is never read.
"""
from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .dataset_index import DatasetIndex
from .store import ObjectMissing, Store, StoreError
from .tar_index import INDEX_SUFFIX, DamagedSample, Entry, SampleReader, sample_fields

CHUNK_BYTES = 16 << 20  # per ranged read: large enough that request latency hardly counts
PREFETCH = 2  # reads in flight, per open shard, while the one before them is decoded
MAX_IN_FLIGHT = 8  # requests in flight per process (a loader worker, or a process without workers)


def plan_reads(entries: list[Entry], first: int, last: int, chunk_bytes: int = CHUNK_BYTES) -> list[tuple[int, int]]:
    """Samples ``first``..``last - 1`` as (first, last) groups, each one ranged read (or one
    sample, if a sample is larger). The reads grow from ``chunk_bytes / 16`` by 4x a read to
    ``chunk_bytes``: the first samples of a segment arrive after a short read, so a lane that
    opens its segments at an epoch's start fills its shuffle buffer sooner."""
    reads, start, limit = [], first, max(1, chunk_bytes // 16)
    for i in range(first + 1, last):
        if entries[i].offset + entries[i].length - entries[start].offset > limit:
            reads.append((start, i))
            start, limit = i, min(chunk_bytes, limit * 4)
    if first < last:
        reads.append((start, last))
    return reads


_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def request_pool() -> ThreadPoolExecutor:
    """This process's reader threads (a forked loader worker makes its own)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix="shard-read"))
        return _pool[1]


_mismatched: set[str] = set()  # shards whose copy in the store failed the manifest's checksum here


@dataclass(frozen=True)
class ShardCache:
    """Whole shards on local disk, shared by the processes of a node (``data.cache_dir``)."""
    directory: Path
    max_bytes: int

    def path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.tar"

    def lookup(self, sha256: str, size: int) -> Path | None:
        path = self.path(sha256)
        try:
            return path if path.stat().st_size == size else None
        except OSError:  # not there, or the cache folder is gone or unusable
            return None

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob("*.tar") if p.is_file())

    def fill(self, store: Store, name: str, sha256: str, size: int) -> Path | None:
        """Download shard ``name`` whole, checked against the manifest's size and sha256; None when
        the cache is full (or its disk), another process is downloading it, the cache folder
        fails, or the download does not match (then the caller streams, and the per-sample checks
        find what is wrong). A shard missing from the store raises ObjectMissing."""
        if sha256 in _mismatched:
            return None  # this process found the store's copy different already: not again
        try:
            return self._fill(store, name, sha256, size)
        except ObjectMissing:
            raise
        except OSError:  # the cache's disk (full, removed, read-only): the cache is optional, stream
            return None

    def _fill(self, store: Store, name: str, sha256: str, size: int) -> Path | None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.used_bytes() + size > self.max_bytes or shutil.disk_usage(self.directory).free < 2 * size:
            return None
        with open(self.directory / f"{sha256}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released if this process dies
            except BlockingIOError:
                return None
            found = self.lookup(sha256, size)
            if found:
                return found
            for stale in self.directory.glob(f"{sha256}.tar.tmp*"):  # of a process killed mid-download
                stale.unlink(missing_ok=True)
            tmp = self.directory / f"{sha256}.tar.tmp{os.getpid()}"
            try:
                if fetch_file(store, name, tmp, size) != sha256:
                    _mismatched.add(sha256)
                    return None  # the store's copy differs from the manifest's: stream, and let the checks tell
                os.replace(tmp, self.path(sha256))
            finally:
                tmp.unlink(missing_ok=True)
            return self.path(sha256)


def fetch_file(store: Store, name: str, dest: Path, size: int | None = None) -> str:
    """Download ``name`` to ``dest`` in prefetched ranged reads; its sha256. ``size``: known
    from the manifest (else asked of the store)."""
    size = store.size(name) if size is None else size
    if size is None:
        raise ObjectMissing(f"{store.shown(name)}: not found")
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        pending = collections.deque()
        for start in range(0, size, CHUNK_BYTES):
            pending.append(request_pool().submit(store.read_range, name, start, min(start + CHUNK_BYTES, size)))
            if len(pending) > PREFETCH:
                _write(out, digest, pending.popleft().result())
        while pending:
            _write(out, digest, pending.popleft().result())
    return digest.hexdigest()


def _write(out, digest, data: bytes) -> None:
    digest.update(data)
    out.write(data)


@dataclass
class RemoteShards:
    """Reads the shards of one remote dataset: its store, its index, and the cache if any.
    Shared by all of the dataset's ``Shard`` records; pickles without its per-process state."""
    store: Store
    index: DatasetIndex | None = None  # None: a dataset prepared before index.npz: one .idx read per shard
    cache: ShardCache | None = None
    chunk_bytes: int = CHUNK_BYTES
    _entries: dict = field(default_factory=dict, repr=False)

    def __getstate__(self):
        return {**self.__dict__, "_entries": {}}

    def describe(self) -> str:
        """The start-up line: where the shards stream from, and how."""
        index = f"index.npz ({self.index.nbytes / 1e6:.1f} MB in memory)" if self.index is not None else \
            "no index.npz: one index read per shard (prepared by an older version)"
        cache = (f"cached in {self.cache.directory} (up to {self.cache.max_bytes / 1e9:g} GB)" if self.cache
                 else "no cache (data.cache_dir)")
        return (f"shards stream from {self.store.shown()}: {index}, reads of up to {self.chunk_bytes >> 20} MB, "
                f"{cache}, a failing store retried for {self.store.retry_s:g} s")

    def entries(self, name: str) -> list[Entry]:
        if self.index is not None and name in self.index:
            return self.index.entries(name)
        if name not in self._entries:
            if len(self._entries) > 64:
                self._entries.clear()
            try:
                payload = json.loads(self.store.read(f"{name}{INDEX_SUFFIX}"))
            except FileNotFoundError:
                raise StoreError(f"{self.store.shown(name + INDEX_SUFFIX)}: missing; remote shards need their "
                                 "index (prepare them again with this version of data_prep)") from None
            self._entries[name] = [Entry.from_json(row) for row in payload["samples"]]
        return self._entries[name]

    def samples(self, name: str, sha256: str, size: int, first: int, last: int, wanted: tuple[str, ...]):
        """(position, fields) for samples ``first``..``last - 1`` of shard ``name``, where fields is a
        {field: bytes, "__key__": key} dict or the DamagedSample that says why it cannot be read.
        Store failures raise (StoreError): they are not the sample's fault. Nothing is read before
        the first ``next``, or ``start()`` of a streamed range (``StreamedRange``)."""
        entries = self.entries(name)
        if last > len(entries):
            raise StoreError(f"{self.store.shown(name)}: its index lists {len(entries)} samples, the manifest more")
        if self.cache is not None and sha256:
            local = self.cache.lookup(sha256, size)
            if local is not None:
                return _local_samples(local, entries, first, last, wanted)
            return self._filled_or_streamed(name, sha256, size, entries, first, last, wanted)
        return self._streamed(name, entries, first, last, wanted)

    def _filled_or_streamed(self, name, sha256, size, entries, first, last, wanted):
        try:
            local = self.cache.fill(self.store, name, sha256, size)
        except ObjectMissing:
            raise StoreError(f"{self.store.shown(name)}: listed in the manifest but missing from the store") from None
        if local is not None:
            yield from _local_samples(local, entries, first, last, wanted)
        else:  # the cache is full, or another process is filling it with this shard
            yield from self._streamed(name, entries, first, last, wanted)

    def _streamed(self, name: str, entries: list[Entry], first: int, last: int, wanted) -> "StreamedRange":
        return StreamedRange(self, name, entries, plan_reads(entries, first, last, self.chunk_bytes), wanted)

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        """One ranged read of shard ``name`` (in a reader thread of ``request_pool``)."""
        try:
            return self.store.read_range(name, start, stop)
        except ObjectMissing:
            raise StoreError(f"{self.store.shown(name)}: listed in the manifest but missing from the store") from None


class StreamedRange:
    """The samples of a range of one remote shard, read in ``reads`` (``plan_reads`` groups):
    ``start()`` sends the first PREFETCH + 1 reads (a lane starts the segments it reads together,
    and the first ones of its next epoch ahead); while one read is decoded, PREFETCH more are in
    flight. Reads not needed any more (the range closed early, an error) are cancelled."""

    def __init__(self, shards: RemoteShards, name: str, entries: list[Entry], reads: list[tuple[int, int]], wanted):
        self.shards, self.name, self.entries, self.wanted = shards, name, entries, wanted
        self.reads, self.pending = collections.deque(reads), collections.deque()
        self.results = None

    def start(self) -> None:
        while self.reads and len(self.pending) <= PREFETCH:  # the first one, and PREFETCH behind it
            self._submit()

    def _submit(self) -> None:
        a, b = self.reads.popleft()
        start, stop = self.entries[a].offset, self.entries[b - 1].offset + self.entries[b - 1].length
        future = request_pool().submit(self.shards.read_range, self.name, start, stop)
        self.pending.append((a, b, start, future))

    def __iter__(self):
        return self

    def __next__(self):
        if self.results is None:
            self.start()
            self.results = self._results()
        return next(self.results)

    def _results(self):
        try:
            while self.pending:
                a, b, base, future = self.pending.popleft()
                while self.reads and len(self.pending) < PREFETCH:
                    self._submit()
                blob = future.result()
                for i in range(a, b):
                    entry = self.entries[i]
                    try:
                        yield i, sample_fields(blob[entry.offset - base:entry.offset - base + entry.length], entry,
                                               self.wanted)
                    except DamagedSample as exc:
                        yield i, exc
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the reads still queued (those running finish and are dropped)."""
        for _, _, _, future in self.pending:
            future.cancel()
        self.pending.clear()
        self.reads.clear()

    def __del__(self):
        self.close()


def _local_samples(path: Path, entries: list[Entry], first: int, last: int, wanted):
    with SampleReader(str(path), entries) as reader:
        for i in range(first, last):
            try:
                yield i, reader.read(i, wanted)
            except (DamagedSample, OSError) as exc:
                yield i, DamagedSample(str(exc), getattr(exc, "key", None) or reader.key(i))

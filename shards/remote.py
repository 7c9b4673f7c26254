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
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil

from .dataset_index import DatasetIndex
from .manifest import create_exclusive
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
    """This process's reader threads (each loader worker makes its own)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix="shard-read"))
        return _pool[1]


# -- the cache ------------------------------------------------------------------------------------
# Its folder holds, per shard (named by its sha256):
#   {sha}.tar                   the shard, renamed into place once its size and sha256 matched
#   {sha}.ok                    the record of that check (``ShardCache.lookup`` trusts nothing else)
#   {sha}.tar.tmp.{host}.{pid}  a download in progress (or left by a killed one, until removed)
#   {sha}.lock                  flock'ed by the process downloading it; holds its LockHolder record
#   {sha}.lockfile              the same where flock is not supported (Lustre without -o flock),
#                               created with O_EXCL; removed when released
# The locks only save bandwidth: two processes that download one shard at once (a stale lock
# taken over while its holder still lives) write their own temporary files and rename the same
# verified contents into place, so correctness never depends on them.
MIN_FREE_SHARE = 0.10  # data.cache_min_free_gb null: this share of the cache's disk always stays free
BOOKKEEPING_BYTES = 16 << 10  # a shard's marker and lock, and its last block, counted with it against the reserve
DEAD_HOLDER_QUIET_S = 60.0  # a lock or download of this host whose process is gone, unchanged this long, is stale
OTHER_HOST_QUIET_S = 1800.0  # another host's (its process cannot be seen): unchanged this long, it is stale
PID_START_SLACK_S = 1.5  # psutil adds /proc/stat's btime, an integer that can move by a second
NO_FLOCK_ERRNOS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)  # flock not supported on that mount
TEMP_INFIX = ".tar.tmp"

_mismatched: set[str] = set()  # shards whose copy in the store failed the manifest's checksum here
_warned_without_flock: set[Path] = set()  # cache folders this process has warned about


@dataclass(frozen=True)
class CacheUsage:
    cached_bytes: int  # whole shards
    partial_bytes: int  # downloads in progress, and those left by killed ones until they are removed
    to_come_bytes: int  # what the downloads in progress will still write (their locks announce their size)


@dataclass(frozen=True)
class LockHolder:
    """Who downloads a shard: the contents of its lock (JSON). ``pid_started`` tells a live
    holder from a reused pid; ``bytes`` is the shard's size, which the others count as to come."""
    host: str
    pid: int
    pid_started: float
    started: str  # ISO time, for people
    bytes: int

    @classmethod
    def me(cls, size: int) -> LockHolder:
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time(),
                   datetime.now(timezone.utc).isoformat(timespec="seconds"), size)

    @classmethod
    def parse(cls, data: bytes) -> LockHolder | None:
        try:
            holder = cls(**json.loads(data))
        except (ValueError, TypeError):  # empty (released, or being written), or not ours
            return None
        ok = (isinstance(holder.host, str) and type(holder.pid) is int and type(holder.bytes) is int
              and isinstance(holder.pid_started, (int, float)))
        return holder if ok else None

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self)) + "\n").encode()

    def is_alive(self) -> bool:
        """On this host: its process still runs (not a reused pid). Another host's: unknown, True."""
        if self.host != socket.gethostname():
            return True
        try:
            process = psutil.Process(self.pid)
            return (process.status() != psutil.STATUS_ZOMBIE
                    and abs(process.create_time() - self.pid_started) <= PID_START_SLACK_S)
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True


@dataclass(frozen=True)
class ShardCache:
    """Whole shards on local disk, shared by the processes of a node (``data.cache_dir``), or of
    several nodes on a shared file system. It stops growing at ``max_bytes`` and where its disk
    would keep less than ``min_free_bytes`` free (None: ``MIN_FREE_SHARE`` of the disk), counting
    the downloads in progress at their full size; a shard it does not take streams."""
    directory: Path
    max_bytes: int
    min_free_bytes: int | None = None
    flock_works: bool = field(default=True, init=False, compare=False)  # else: O_EXCL lock files

    def __post_init__(self):
        # Found out here, in the process that opens the dataset, so that the warning is one line
        # per process rather than one per loader worker; the workers get the answer with the cache.
        object.__setattr__(self, "flock_works", _flock_works(self.directory))

    def path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.tar"

    def marker(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.ok"

    def lookup(self, sha256: str, size: int) -> Path | None:
        """The cached shard, if it is the very file whose sha256 was checked when it entered."""
        path = self.path(sha256)
        try:
            recorded = json.loads(self.marker(sha256).read_bytes())
            stat = path.stat()
        except (OSError, ValueError):  # not there, not checked, or the cache folder is gone or unusable
            return None
        return path if stat.st_size == size and recorded == _identity(sha256, stat) else None

    def reserve_bytes(self) -> int:
        """The free space the cache leaves on its disk."""
        if self.min_free_bytes is not None:
            return self.min_free_bytes
        return int(MIN_FREE_SHARE * shutil.disk_usage(self.directory).total)

    def usage(self) -> CacheUsage:
        cached = partial = to_come = 0
        for entry in os.scandir(self.directory):
            try:
                if entry.name.endswith(".tar"):
                    cached += entry.stat().st_size
                elif TEMP_INFIX in entry.name:
                    written = entry.stat().st_size
                    partial += written
                    to_come += max(0, self._announced_bytes(entry.name) - written)
            except FileNotFoundError:
                pass  # renamed or removed meanwhile
        return CacheUsage(cached, partial, to_come)

    def fill(self, store: Store, name: str, sha256: str, size: int) -> Path | None:
        """Download shard ``name`` whole, checked against the manifest's size and sha256; None when
        the cache is full (max_bytes, or its disk's reserve), another process is downloading it,
        the cache folder fails, or the download does not match (then the caller streams, and the
        per-sample checks find what is wrong). A shard missing from the store raises ObjectMissing."""
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
        release = self._lock(sha256, LockHolder.me(size))
        if release is None:
            return None  # another process downloads it: stream meanwhile
        try:
            found = self.lookup(sha256, size)
            if found or self._checked_in_place(sha256, size):
                return self.path(sha256)
            self._remove_stale_downloads()
            tmp = self.directory / f"{sha256}{TEMP_INFIX}.{socket.gethostname()}.{os.getpid()}"
            tmp.touch()  # from now on the others count it, and what it will write (announced by the lock)
            try:
                if not self._room_for(sha256):
                    return None
                if fetch_file(store, name, tmp, size) != sha256:
                    _mismatched.add(sha256)
                    return None  # the store's copy differs from the manifest's: stream, and let the checks tell
                os.replace(tmp, self.path(sha256))
                self._record_checked(sha256, self.path(sha256).stat())
            finally:
                tmp.unlink(missing_ok=True)
            return self.path(sha256)
        finally:
            release()

    def _room_for(self, sha256: str) -> bool:
        """Whether, once every download in progress (this one included) is done, the cache stays
        within max_bytes and its disk keeps its reserve free."""
        usage = self.usage()
        try:
            replaced = self.path(sha256).stat().st_size  # a copy that failed its check: it goes
        except FileNotFoundError:
            replaced = 0
        if usage.cached_bytes - replaced + usage.partial_bytes + usage.to_come_bytes > self.max_bytes:
            return False
        free = shutil.disk_usage(self.directory).free
        return free - usage.to_come_bytes - BOOKKEEPING_BYTES >= self.reserve_bytes()

    def _checked_in_place(self, sha256: str, size: int) -> bool:
        """A shard in the cache without a (matching) record, from an earlier version or copied
        there by hand: hashed where it is (cheaper than downloading it again), and recorded if it
        matches the manifest."""
        try:
            with open(self.path(sha256), "rb") as f:
                before = os.fstat(f.fileno())
                if before.st_size != size or hashlib.file_digest(f, "sha256").hexdigest() != sha256:
                    return False
                if _identity(sha256, os.fstat(f.fileno())) != _identity(sha256, before):
                    return False  # changed while it was read
        except FileNotFoundError:
            return False
        self._record_checked(sha256, before)
        return True

    def _record_checked(self, sha256: str, checked: os.stat_result) -> None:
        # The record vouches for one file: the inode, size, mtime and ctime that it had when its
        # sha256 was checked (right after the rename, or while it was hashed in place). Writing to
        # it, truncating it or putting another file in its place (a copy by hand, another rename)
        # changes at least one of them, and ctime cannot be set back from user space, so lookup's
        # comparison of all four is as sound as hashing the file again (short of changing the
        # disk beneath the file system). It is written after the rename and renamed into place
        # itself: a process killed in between leaves a shard without a record, hashed again.
        record = json.dumps(_identity(sha256, checked)).encode()
        tmp = self.directory / f".{sha256}.ok.{socket.gethostname()}.{os.getpid()}"
        tmp.write_bytes(record)
        os.replace(tmp, self.marker(sha256))

    def _announced_bytes(self, temp_name: str) -> int:
        """The size the download writing ``temp_name`` announced in its lock (0: none that says so)."""
        sha256, host, pid = _temp_owner(temp_name)
        for suffix in (".lock", ".lockfile"):
            try:
                holder = LockHolder.parse((self.directory / f"{sha256}{suffix}").read_bytes())
            except OSError:
                continue
            if holder is not None and (holder.host, holder.pid) == (host, pid):
                return holder.bytes
        return 0

    def _lock(self, sha256: str, me: LockHolder):
        """Take the shard's download lock: the function that releases it, or None if another
        process holds it. flock, released by the kernel if its holder dies; where the mount does
        not support it, a lock file made with O_EXCL."""
        if self.flock_works:
            fd = os.open(self.directory / f"{sha256}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in NO_FLOCK_ERRNOS:
                    raise
                _warn_without_flock(self.directory, exc)
                object.__setattr__(self, "flock_works", False)
            else:
                os.ftruncate(fd, 0)
                os.pwrite(fd, me.to_bytes(), 0)

                def release():
                    os.ftruncate(fd, 0)  # announces nothing once released (the file stays: others may hold it open)
                    os.close(fd)
                return release
        path = self.directory / f"{sha256}.lockfile"
        data = me.to_bytes()
        if create_exclusive(path, data) or (self._stale_lock_removed(path, sha256) and create_exclusive(path, data)):
            return lambda: _remove_if_holds(path, data)
        return None

    def _stale_lock_removed(self, path: Path, sha256: str) -> bool:
        """Remove the lock file ``path`` if its holder is dead or has been quiet too long (stated
        at DEAD_HOLDER_QUIET_S and OTHER_HOST_QUIET_S); True if it is gone."""
        try:
            data, lock_mtime_ns = _read_with_mtime(path)
        except FileNotFoundError:
            return True  # released meanwhile
        holder = LockHolder.parse(data)
        activity_ns = [lock_mtime_ns]
        if holder is not None:  # its download writes as it goes: that is its heartbeat
            with contextlib.suppress(FileNotFoundError):
                activity_ns.append((self.directory / f"{sha256}{TEMP_INFIX}.{holder.host}.{holder.pid}")
                                   .stat().st_mtime_ns)
        if holder is None or holder.host == socket.gethostname():
            if holder is not None and holder.is_alive():
                return False
            quiet_needed = DEAD_HOLDER_QUIET_S  # (an unreadable lock may be being written)
        else:
            quiet_needed = OTHER_HOST_QUIET_S
        if _file_system_now_ns(self.directory) - max(activity_ns) <= quiet_needed * 1e9:
            return False
        return _remove_if_holds(path, data)

    def _remove_stale_downloads(self) -> None:
        """Remove the partial downloads of processes gone from this host, and other hosts' (and
        unattributable) ones unchanged for OTHER_HOST_QUIET_S: never a live download."""
        now_ns, here = None, socket.gethostname()
        for temp in self.directory.glob(f"*{TEMP_INFIX}*"):
            _, host, pid = _temp_owner(temp.name)
            if host == here and psutil.pid_exists(pid):
                continue
            quiet_needed = DEAD_HOLDER_QUIET_S if host == here else OTHER_HOST_QUIET_S
            try:
                mtime_ns = temp.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            now_ns = now_ns or _file_system_now_ns(self.directory)
            if now_ns - mtime_ns > quiet_needed * 1e9:
                temp.unlink(missing_ok=True)


def _identity(sha256: str, stat: os.stat_result) -> dict:
    return {"sha256": sha256, "bytes": stat.st_size, "inode": stat.st_ino, "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns}


def _temp_owner(name: str) -> tuple[str, str | None, int | None]:
    """(sha256, host, pid) of a partial download ``{sha}.tar.tmp.{host}.{pid}`` (host and pid
    None for a name it does not fit, e.g. an earlier version's ``{sha}.tar.tmp{pid}``)."""
    sha256, _, owner = name.partition(TEMP_INFIX)
    host, _, pid = owner[1:].rpartition(".")
    if not owner.startswith(".") or not host or not pid.isdigit():
        return sha256, None, None
    return sha256, host, int(pid)


def _flock_works(directory: Path) -> bool:
    """Whether flock works in ``directory`` (warned once if not); True if it cannot be told yet
    (the folder cannot be made: filling fails, and the shards stream)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".flock-probe", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        pass  # another process probes it right now: it works
    except OSError as exc:
        if exc.errno not in NO_FLOCK_ERRNOS:
            return True  # another failure: filling meets it, and streams
        _warn_without_flock(directory, exc)
        return False
    finally:
        os.close(fd)
    return True


def _warn_without_flock(directory: Path, exc: OSError) -> None:
    if directory not in _warned_without_flock:
        _warned_without_flock.add(directory)
        print(f"warning: {directory}: flock fails there ({os.strerror(exc.errno)}; a Lustre mount needs "
              "-o flock): the shard cache locks with lock files made with O_EXCL instead", file=sys.stderr, flush=True)


def _read_with_mtime(path: Path) -> tuple[bytes, int]:
    with open(path, "rb") as f:  # open, then fstat: NFS revalidates attributes on open
        return f.read(), os.fstat(f.fileno()).st_mtime_ns


def _remove_if_holds(path: Path, data: bytes) -> bool:
    """Remove ``path`` if it still holds ``data``; True if it is gone. There is no
    compare-and-delete: rename it to a name of our own (of two renames only one succeeds), look,
    and link it back (never over a newer one) if it was not the one meant."""
    aside = path.with_name(f"{path.name}.aside.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True
    try:
        if aside.read_bytes() == data:
            return True
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        return False
    finally:
        aside.unlink(missing_ok=True)


def _file_system_now_ns(directory: Path) -> int:
    """Now by the clock that stamps the folder's files (a file server's, on a shared disk): the
    ages of other hosts' files are measured with it, not with this host's clock."""
    probe = directory / f".clock.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}"
    probe.touch()
    try:
        os.utime(probe)  # times=None: NFS and Lustre set the server's time
        return probe.stat().st_mtime_ns
    finally:
        probe.unlink(missing_ok=True)


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
        cache = "no cache (data.cache_dir)"
        if self.cache:
            reserve = (f"{self.cache.min_free_bytes / 1e9:g} GB" if self.cache.min_free_bytes is not None
                       else f"{MIN_FREE_SHARE:.0%} of its disk")
            cache = f"cached in {self.cache.directory} (up to {self.cache.max_bytes / 1e9:g} GB, keeping {reserve} free)"
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

"""The shard cache on a real (small) disk and real lock files: it keeps its reserve of free
space, counting downloads in progress; without flock (Lustre) it warns once and locks with
O_EXCL files, taken over only from dead or long-quiet holders; stale downloads are removed by
age, never a live one; only a shard whose sha256 was checked as it entered is read back."""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipeline.data.prepared import RemoteOptions, Sample, open_prepared, shard_range
from shards.remote import (
    BOOKKEEPING_BYTES,
    DEAD_HOLDER_QUIET_S,
    MIN_FREE_SHARE,
    OTHER_HOST_QUIET_S,
    ShardCache,
)
from shards.store import Store, StoreError

HOST = socket.gethostname()


@pytest.fixture
def small_disk(tmpfs):
    return tmpfs("2m")


@pytest.fixture
def no_flock(monkeypatch):
    """flock as on a Lustre mount without the flock option: ENOSYS, at the very call."""
    def flock(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    monkeypatch.setattr(fcntl, "flock", flock)


def samples(shards) -> list[tuple]:
    out = []
    for shard in shards:
        for item in shard_range(shard, 0, shard.samples, 4):
            assert isinstance(item, Sample), item
            out.append((item.key, item.data, item.label, item.index))
    return out


def fill_to(disk: Path, free_bytes: int) -> None:
    """A ballast file that leaves about ``free_bytes`` free on ``disk``."""
    subprocess.run(["fallocate", "-l", str(shutil.disk_usage(disk).free - free_bytes), str(disk / "ballast")],
                   check=True)


def age(path: Path, seconds: float) -> None:
    then = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(then, then))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def lock_record(host: str, pid: int, pid_started: float, size: int) -> str:
    return json.dumps({"host": host, "pid": pid, "pid_started": pid_started, "started": "2025-01-01T00:00:00+00:00",
                       "bytes": size})


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def test_the_cache_keeps_its_reserve_free_on_a_small_disk(tiny_data, http_server_factory, small_disk):
    """Shards 30 KB, a 2 MiB disk with room for about three above its default reserve (10%):
    the reserve, not data.cache_max_gb, stops the fill; the rest streams, sample for sample."""
    train = open_prepared(tiny_data).train
    reserve = MIN_FREE_SHARE * shutil.disk_usage(small_disk).total
    fill_to(small_disk, int(reserve + 3.5 * (train[0].bytes + BOOKKEEPING_BYTES)))
    options = RemoteOptions(retry_s=5, cache_dir=str(small_disk / "cache"), cache_max_gb=100)
    data = open_prepared(http_server_factory(tiny_data).url, options)
    assert samples(data.train) == samples(train)
    cache = data.train[0].remote.cache
    cached = [s for s in data.train if cache.lookup(s.sha256, s.bytes)]
    free = shutil.disk_usage(small_disk).free
    print(f"\n2 MiB disk: {len(cached)} of {len(data.train)} shards cached, {free / 1024:.0f} KiB left free, "
          f"reserve {reserve / 1024:.0f} KiB")
    assert 0 < len(cached) < len(data.train)
    assert reserve <= free < reserve + 2 * (train[0].bytes + BOOKKEEPING_BYTES)  # filled up to the reserve
    assert not list((small_disk / "cache").glob("*.tmp*"))
    stated = open_prepared(data.directory, dataclasses.replace(options, cache_min_free_gb=0.5))
    assert stated.train[0].remote.cache.reserve_bytes() == 500_000_000  # data.cache_min_free_gb


def test_downloads_in_progress_count_toward_the_cache_and_its_reserve(tiny_data, http_server_factory, small_disk,
                                                                      tmp_path):
    store, (first, second) = Store(str(tiny_data)), open_prepared(tiny_data).train[:2]
    # Another host's partial download counts toward data.cache_max_gb, at the size it has.
    cache = ShardCache(tmp_path / "cache", max_bytes=first.bytes + second.bytes + 1000)
    partial = cache.directory / f"{'a' * 64}.tar.tmp.node-b.4242"
    partial.write_bytes(bytes(second.bytes))
    assert cache.fill(store, first.name, first.sha256, first.bytes) == cache.path(first.sha256)
    assert cache.fill(store, second.name, second.sha256, second.bytes) is None
    partial.unlink()
    assert cache.fill(store, second.name, second.sha256, second.bytes) == cache.path(second.sha256)

    # A download in progress (stalled in the middle) counts with what it will still write.
    served = tmp_path / "served"
    served.mkdir()
    blob = os.urandom(256 << 10)
    (served / "blob").write_bytes(blob)
    server = http_server_factory(served, chunk_delay=3600)
    free = shutil.disk_usage(small_disk).free
    # Two processes' caches in one folder: one downloads the blob, the other keeps a reserve that
    # leaves room for the first shard and 128 KiB more, not for the blob's 256 KiB as well.
    cache = ShardCache(small_disk / "cache", max_bytes=1 << 30,
                       min_free_bytes=free - first.bytes - 2 * BOOKKEEPING_BYTES - (128 << 10))
    blob_sha = hashlib.sha256(blob).hexdigest()
    errors = []

    def download():
        other = ShardCache(cache.directory, max_bytes=1 << 30, min_free_bytes=0)
        try:
            other.fill(Store(server.url, retry_s=0.5), "blob", blob_sha, len(blob))
        except StoreError as exc:
            errors.append(exc)

    thread = threading.Thread(target=download)
    thread.start()
    deadline = time.monotonic() + 120
    while not list(cache.directory.glob(f"{blob_sha}.tar.tmp.*")):
        assert time.monotonic() < deadline and thread.is_alive(), errors
        time.sleep(0.05)
    assert cache.fill(store, first.name, first.sha256, first.bytes) is None  # the blob's 256 KiB to come
    server.stop()  # the blob's download fails: its partial file goes
    thread.join(timeout=120)
    assert errors and not list(cache.directory.glob("*.tmp*"))
    assert cache.fill(store, first.name, first.sha256, first.bytes) == cache.path(first.sha256)
    assert shutil.disk_usage(small_disk).free >= cache.min_free_bytes


def test_without_flock_one_warning_and_lock_files_fill_the_cache(tiny_data, http_server_factory, tmp_path, no_flock,
                                                                   capsys):
    server = http_server_factory(tiny_data)
    options = RemoteOptions(retry_s=5, cache_dir=str(tmp_path / "cache"), cache_max_gb=1)
    reference = samples(open_prepared(tiny_data).train)
    data = open_prepared(server.url, options)
    assert samples(data.train) == reference  # epoch 1 fills the cache
    warnings = [line for line in capsys.readouterr().err.splitlines() if "flock" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {tmp_path / 'cache'}: "), warnings
    assert "O_EXCL" in warnings[0]
    assert all(data.train[0].remote.cache.lookup(s.sha256, s.bytes) for s in data.train)
    assert not list((tmp_path / "cache").glob("*.lockfile")) and not list((tmp_path / "cache").glob("*.tmp*"))
    server.clear_log()
    assert samples(data.train) == reference
    assert server.requests() == []  # epoch 2 reads the cache only


def test_a_lock_file_is_taken_over_only_from_a_dead_or_long_quiet_holder(tiny_data, tmp_path, no_flock, sleeper):
    store, shard = Store(str(tiny_data)), open_prepared(tiny_data).train[0]
    cache = ShardCache(tmp_path / "cache", max_bytes=1 << 30)
    lock = cache.directory / f"{shard.sha256}.lockfile"
    live = psutil.Process(sleeper.pid).create_time()

    def held_by(host, pid, pid_started, quiet_s) -> bool:
        lock.write_text(lock_record(host, pid, pid_started, shard.bytes))
        age(lock, quiet_s)
        if cache.fill(store, shard.name, shard.sha256, shard.bytes) is None:
            return lock.read_text() == lock_record(host, pid, pid_started, shard.bytes)  # left alone
        assert not lock.exists() and cache.lookup(shard.sha256, shard.bytes)
        cache.path(shard.sha256).unlink()
        return False

    assert held_by(HOST, sleeper.pid, live, quiet_s=3600)  # a live holder on this host
    assert not held_by(HOST, sleeper.pid, live - 1000, quiet_s=DEAD_HOLDER_QUIET_S + 60)  # its pid, reused
    assert held_by(HOST, dead_pid(), 0.0, quiet_s=1)  # dead, but may have just written it
    assert not held_by(HOST, dead_pid(), 0.0, quiet_s=DEAD_HOLDER_QUIET_S + 60)
    assert held_by("node-b", 77, 0.0, quiet_s=OTHER_HOST_QUIET_S - 300)  # another host's: we cannot see it
    assert not held_by("node-b", 77, 0.0, quiet_s=OTHER_HOST_QUIET_S + 60)
    temp = cache.directory / f"{shard.sha256}.tar.tmp.node-b.77"  # ... unless its download still writes
    temp.write_bytes(b"x")
    assert held_by("node-b", 77, 0.0, quiet_s=OTHER_HOST_QUIET_S + 60)
    lock.write_text("")  # half-written by a holder killed at once
    age(lock, DEAD_HOLDER_QUIET_S + 60)
    assert cache.fill(store, shard.name, shard.sha256, shard.bytes) == cache.path(shard.sha256)


def test_stale_downloads_are_removed_by_age_never_a_live_one(tiny_data, tmp_path, sleeper):
    store, shard = Store(str(tiny_data)), open_prepared(tiny_data).train[0]
    cache = ShardCache(tmp_path / "cache", max_bytes=1 << 30)
    gone = dead_pid()
    temps = {  # name: (age in seconds, kept)
        f"{'1' * 64}.tar.tmp.{HOST}.{sleeper.pid}": (3 * OTHER_HOST_QUIET_S, True),  # live, if quiet
        f"{'2' * 64}.tar.tmp.{HOST}.{gone}": (DEAD_HOLDER_QUIET_S + 60, False),
        f"{'3' * 64}.tar.tmp.{HOST}.{gone}": (1, True),
        f"{'4' * 64}.tar.tmp.node-b.{sleeper.pid}": (OTHER_HOST_QUIET_S - 300, True),
        f"{'5' * 64}.tar.tmp.node-b.{sleeper.pid}": (OTHER_HOST_QUIET_S + 60, False),
        f"{'6' * 64}.tar.tmp{gone}": (OTHER_HOST_QUIET_S + 60, False),  # named by an earlier version
    }
    for name, (seconds, _) in temps.items():
        (cache.directory / name).write_bytes(b"partial")
        age(cache.directory / name, seconds)
    assert cache.fill(store, shard.name, shard.sha256, shard.bytes) == cache.path(shard.sha256)
    assert {p.name for p in cache.directory.glob("*.tmp*")} == {name for name, (_, kept) in temps.items() if kept}


def test_only_a_shard_checked_as_it_entered_the_cache_is_read_from_it(tiny_data, http_server_factory, tmp_path):
    server, shard = http_server_factory(tiny_data), open_prepared(tiny_data).train[0]
    store = Store(server.url, retry_s=5)
    cache = ShardCache(tmp_path / "cache", max_bytes=1 << 30)
    path, original = cache.path(shard.sha256), (tiny_data / shard.name).read_bytes()
    path.write_bytes(original)  # copied there by hand (or by an earlier version): not checked yet
    assert cache.lookup(shard.sha256, shard.bytes) is None
    assert cache.fill(store, shard.name, shard.sha256, shard.bytes) == path
    assert cache.lookup(shard.sha256, shard.bytes) == path and server.requests() == []  # hashed where it is

    def damaged_in_place(change) -> bool:
        stat = path.stat()
        with open(path, "r+b") as f:
            change(f)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old mtime
        assert path.stat().st_size == shard.bytes
        missed = cache.lookup(shard.sha256, shard.bytes) is None
        server.clear_log()
        assert cache.fill(store, shard.name, shard.sha256, shard.bytes) == path
        assert [line.split()[1] for line in server.requests()] == [f"/{shard.name}"]  # downloaded again
        assert path.read_bytes() == original and cache.lookup(shard.sha256, shard.bytes) == path
        return missed

    assert damaged_in_place(lambda f: (f.seek(1000), f.write(b"\0" * 512)))  # the right size, wrong contents
    assert damaged_in_place(lambda f: (f.truncate(1000), f.truncate(shard.bytes)))  # truncated, then extended

"""One live job per run directory: ``RUN_DIR/run.lock`` names the job that holds it.

A second launch into the same directory (a SLURM job resubmitted while the first still runs)
is refused with a message naming the holder; a stale lock is taken over. Stale, in this order:

- the holder ran on this host: stale if its pid is gone, or now belongs to another process
  (its create time differs);
- the holder ran on another host as this very SLURM job (``SLURM_JOB_ID``): a requeued job
  takes over its own run, as SLURM ends a job's processes before it runs it again;
- the holder ran on another host: stale if its heartbeat (the lock's mtime) is older than
  ``stale_after_s``, measured against a probe file touched in the same directory, so that both
  times come from the file server's clock rather than from two hosts' clocks.

Only atomic file operations are used, never fcntl/flock, which NFS and Lustre do not honour
reliably: a lock is published complete with ``os.link`` (which never overwrites), and a stale
one is renamed away, checked and, if it was not the one judged stale, linked back. Take-overs
are serialised by a short-lived guard file (``O_CREAT|O_EXCL``) so that one taker cannot move
away a lock that another taker has just published.

Exactly one process per job acquires the lock (the main process; never every DDP rank: ranks
share ``SLURM_JOB_ID`` and would take it over from each other). A holder on another host must
heartbeat (``start_heartbeat``) well within ``stale_after_s``.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil

from shards.manifest import create_exclusive

LOCK_FILE = "run.lock"
GUARD_FILE = "run.lock.takeover"
UNREADABLE_GRACE_S = 5.0  # an unparsable lock younger than this may still be being written
GUARD_STALE_S = 10.0  # a take-over takes milliseconds: a guard this old was left by a killed taker
PID_START_SLACK_S = 1.5  # psutil adds /proc/stat's btime, an integer that can move by a second
GIVE_UP_S = 30.0


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    pid_started: float  # the process's create time: tells a live holder from a reused pid
    job: str | None  # SLURM_JOB_ID
    started: str  # ISO time the lock was taken

    @classmethod
    def current(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time(),
                   os.environ.get("SLURM_JOB_ID") or None,
                   datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            d = json.loads(data)
            holder = cls(d["host"], d["pid"], d["pid_started"], d["job"], d["started"])
        except (ValueError, KeyError, TypeError):
            return None
        ok = (isinstance(holder.host, str) and type(holder.pid) is int
              and isinstance(holder.pid_started, (int, float)) and isinstance(holder.job, (str, type(None)))
              and isinstance(holder.started, str))
        return holder if ok else None

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self)) + "\n").encode()

    def describe(self) -> str:
        job = f" (SLURM job {self.job})" if self.job else ""
        return f"pid {self.pid} on {self.host}{job}"


class RunDirInUse(Exception):
    """Another live job holds the run directory; str() is one line naming it."""

    def __init__(self, run_dir: Path, holder: Holder | None = None, heartbeat_age_s: float | None = None,
                 message: str | None = None):
        self.run_dir, self.holder, self.heartbeat_age_s = run_dir, holder, heartbeat_age_s
        lock = run_dir / LOCK_FILE
        if message is None and holder is None:
            message = f"{run_dir} is in use: its lock {lock} kept changing for {GIVE_UP_S:.0f} s; try again"
        elif message is None:
            message = (f"{run_dir} is in use by {holder.describe()} since {holder.started}; "
                       f"heartbeat {max(heartbeat_age_s, 0):.0f} s ago. Wait for it to end, or use another "
                       f"name=... (remove {lock} only if that job is gone)")
        super().__init__(message)


@dataclass(frozen=True)
class _Seen:
    data: bytes
    mtime_ns: int


def _read(path: Path) -> _Seen | None:
    try:
        # open, then fstat: NFS revalidates attributes on open (close-to-open consistency)
        with open(path, "rb") as f:
            return _Seen(f.read(), os.fstat(f.fileno()).st_mtime_ns)
    except FileNotFoundError:
        return None


def _unique() -> str:
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def _age_s(directory: Path, mtime_ns: int) -> float:
    """Seconds since mtime_ns by the file server's clock: touch a probe and compare."""
    probe = directory / f".{LOCK_FILE}.probe.{_unique()}"
    create_exclusive(probe, b"")
    try:
        os.utime(probe)  # times=None: NFS sets the server's time
        return (os.stat(probe).st_mtime_ns - mtime_ns) / 1e9
    finally:
        probe.unlink(missing_ok=True)


def _publish(path: Path, data: bytes) -> bool:
    """Create path with data, complete, unless it exists: write a temp file, then link it."""
    tmp = path.with_name(f".{path.name}.new.{_unique()}")
    create_exclusive(tmp, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        # NFS: a retransmitted link that had succeeded answers EEXIST; the link count tells
        return os.stat(tmp).st_nlink == 2
    finally:
        tmp.unlink(missing_ok=True)


def _remove_if(path: Path, data: bytes, mtime_ns: int | None = None) -> bool:
    """Remove path if it still holds data (and mtime_ns, if given); True if removed.

    There is no compare-and-delete: rename it to a name of our own (of concurrent renames only
    one succeeds), look at what we got and link it back if it is not the file meant (link never
    overwrites a lock published in between; if one was, the moved lock's holder is told by its
    next still_ours())."""
    aside = path.with_name(f".{path.name}.aside.{_unique()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        got = _read(aside)
        if got is not None and got.data == data and mtime_ns in (None, got.mtime_ns):
            return True
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        return False
    finally:
        aside.unlink(missing_ok=True)


def _stale_reason(holder: Holder, seen: _Seen, run_dir: Path, stale_after_s: float) -> str | None:
    """Why the holder is no longer live, or None if it is. On this host the process itself is
    checked (two launches inside one allocation share a SLURM job id, and both may be live)."""
    if holder.host == socket.gethostname():
        try:
            process = psutil.Process(holder.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return "its process is gone"
            if abs(process.create_time() - holder.pid_started) > PID_START_SLACK_S:
                return f"its process is gone (pid {holder.pid} now belongs to another process)"
        except psutil.NoSuchProcess:
            return "its process is gone"
        except psutil.AccessDenied:
            pass  # it exists: assume live
        return None
    if holder.job and holder.job == os.environ.get("SLURM_JOB_ID"):
        return f"its SLURM job {holder.job} is this one, requeued onto another node"
    age = _age_s(run_dir, seen.mtime_ns)
    return f"no heartbeat for {age:.0f} s" if age > stale_after_s else None


def _take_over(path: Path, seen: _Seen) -> bool:
    """Remove the stale lock `seen` under the take-over guard; False: start again."""
    guard = path.with_name(GUARD_FILE)
    mine = _unique().encode()
    if not create_exclusive(guard, mine):
        other = _read(guard)
        if other is not None and _age_s(path.parent, other.mtime_ns) > GUARD_STALE_S:
            _remove_if(guard, other.data, other.mtime_ns)
        else:
            time.sleep(0.05)
        return False
    try:
        # Judged before we held the guard: another taker may have replaced it meanwhile.
        return _read(path) == seen and _remove_if(path, seen.data, seen.mtime_ns)
    finally:
        _remove_if(guard, mine)


def acquire(run_dir: Path, stale_after_s: float = 600.0) -> RunLock:
    """Take run_dir/run.lock, taking over a stale one; RunDirInUse if a live job holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    me = Holder.current()
    data = me.to_bytes()
    took_over, why = None, None
    deadline = time.monotonic() + GIVE_UP_S
    while time.monotonic() < deadline:
        if _publish(path, data):
            return RunLock(path, me, data, took_over, why)
        seen = _read(path)
        if seen is None:
            continue  # released meanwhile
        holder = Holder.parse(seen.data)
        if holder is None:
            age = _age_s(run_dir, seen.mtime_ns)
            if age < UNREADABLE_GRACE_S:
                time.sleep(0.1)  # its writer may be halfway
                continue
            reason = f"its lock file was unreadable for {age:.0f} s"
        else:
            reason = _stale_reason(holder, seen, run_dir, stale_after_s)
            if reason is None:
                raise RunDirInUse(run_dir, holder, _age_s(run_dir, seen.mtime_ns))
        if _take_over(path, seen):
            took_over, why = holder, reason
    raise RunDirInUse(run_dir, None, None)


class RunLock:
    """A held run.lock. `took_over` names the holder of the stale lock that acquire replaced
    (None if there was none, or it was unreadable), `took_over_why` says why it was stale."""

    def __init__(self, path: Path, holder: Holder, data: bytes, took_over: Holder | None, took_over_why: str | None):
        self.path, self.holder = path, holder
        self.took_over, self.took_over_why = took_over, took_over_why
        self._data = data
        self._lost = self._released = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def still_ours(self) -> bool:
        """Whether run.lock is still the one we published; once not, never again."""
        if self._lost or self._released:
            return False
        seen = _read(self.path)
        if seen is None or seen.data != self._data:
            self._lost = True
        return not self._lost

    def heartbeat(self) -> None:
        """Refresh the lock's mtime, if it is still ours."""
        if self.still_ours():
            try:
                os.utime(self.path)  # times=None: NFS sets the server's time, as for the probe
            except FileNotFoundError:
                pass  # taken away just now: the next still_ours() says so

    def start_heartbeat(self, every_s: float = 60.0) -> None:
        """Heartbeat from a daemon thread until release() or the lock is lost."""
        def beat():
            while not self._stop.wait(every_s) and not self._lost:
                try:
                    self.heartbeat()
                except OSError:
                    pass  # a file-server hiccup: try again next time

        if self._thread is None:
            self._thread = threading.Thread(target=beat, name=f"heartbeat {self.path}", daemon=True)
            self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours; idempotent."""
        if self._released:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self.still_ours():
            _remove_if(self.path, self._data)
        self._released = True

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

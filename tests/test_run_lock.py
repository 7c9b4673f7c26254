"""run.lock with real processes: live holders, killed ones, reused pids, requeued SLURM jobs,
other hosts, a race of takers, lost locks and half-written lock files."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, subprocess_env

from pipeline.ops import run_lock
from pipeline.ops.run_lock import Holder, RunDirInUse, acquire

HOST = socket.gethostname()

# Takes the lock, says so, then holds it until killed.
HOLD = """
import sys, time
from pipeline.ops.run_lock import acquire
lock = acquire(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""

# Waits for the start signal, then tries; a winner writes a marker and holds the lock a while.
RACE = """
import os, sys, time
from pathlib import Path
from pipeline.ops.run_lock import RunDirInUse, acquire
run_dir, go = Path(sys.argv[1]), Path(sys.argv[2])
(go.parent / f"ready.{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.001)
try:
    lock = acquire(run_dir)
except RunDirInUse as e:
    print(e.holder.pid)
    sys.exit(3)
(go.parent / f"won.{os.getpid()}").touch()
time.sleep(1.5)  # longer than any loser can be scheduled late on a loaded machine
assert lock.still_ours()
lock.release()
"""


@pytest.fixture(autouse=True)
def no_slurm_job(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # the tests may run inside a SLURM job


def start_holder(run_dir: Path, **env) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT, env={**subprocess_env(), **env},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def holders():
    started = []

    def start(run_dir: Path, **env) -> subprocess.Popen:
        started.append(start_holder(run_dir, **env))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def write_lock(run_dir: Path, holder: Holder, age_s: float = 0.0, data: bytes | None = None) -> Path:
    path = run_dir / "run.lock"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_bytes(json.dumps(asdict(holder)).encode() if data is None else data)
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def lock_pid(run_dir: Path) -> int:
    return json.loads((run_dir / "run.lock").read_text())["pid"]


def test_live_holder_refuses(tmp_path, holders):
    holder = holders(tmp_path / "demo")
    before = (tmp_path / "demo" / "run.lock").read_bytes()
    with pytest.raises(RunDirInUse) as refused:
        acquire(tmp_path / "demo")
    message = str(refused.value)
    assert f"pid {holder.pid} on {HOST}" in message and " since 20" in message
    assert re.search(r"; heartbeat \d+ s ago\. ", message)
    assert str(tmp_path / "demo") in message and "\n" not in message
    assert (tmp_path / "demo" / "run.lock").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "demo")) == ["run.lock"]  # no probe or temp file left


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_killed_holder_is_taken_over(tmp_path, reaped):
    holder = start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    if reaped:
        holder.wait()
    else:
        while psutil.Process(holder.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
    try:
        with acquire(tmp_path) as lock:
            assert lock.took_over.pid == holder.pid and lock.took_over.host == HOST
            assert "gone" in lock.took_over_why
            assert lock_pid(tmp_path) == os.getpid() and lock.still_ours()
        assert not (tmp_path / "run.lock").exists()
    finally:
        holder.wait()


def test_reused_pid_is_stale(tmp_path):
    parent = psutil.Process(os.getppid())
    real = Holder(HOST, parent.pid, parent.create_time(), None, "2026-01-01T00:00:00+00:00")
    write_lock(tmp_path, real)
    with pytest.raises(RunDirInUse):  # the same pid with its own create time: live
        acquire(tmp_path)
    write_lock(tmp_path, Holder(HOST, parent.pid, parent.create_time() - 1000, None, real.started))
    with acquire(tmp_path) as lock:
        assert lock.took_over.pid == parent.pid and "another process" in lock.took_over_why


def test_requeued_slurm_job_takes_over_its_own_run(tmp_path, holders, monkeypatch):
    # On this host the process decides: a live holder keeps the lock even for its own job id
    # (two launches inside one allocation share it).
    holder = holders(tmp_path, SLURM_JOB_ID="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with pytest.raises(RunDirInUse, match="SLURM job 4242"):
        acquire(tmp_path)
    assert holder.poll() is None
    holder.kill()
    holder.wait()
    # From another host with a fresh heartbeat: taken over for the job id alone (SLURM ends a
    # job's processes before running it again); another job's is refused.
    other = Holder("node-elsewhere", 4321, 1.0e9, "4242", "2026-01-01T00:00:00+00:00")
    run_dir = tmp_path / "other"
    write_lock(run_dir, other)
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(RunDirInUse, match="SLURM job 4242"):
        acquire(run_dir)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with acquire(run_dir) as lock:
        assert (lock.took_over, lock.holder.job) == (other, "4242")
        assert "requeued" in lock.took_over_why


@pytest.mark.parametrize("age_s, stale_after_s, taken", [(700, 600, True), (30, 10, True), (2, 600, False)])
def test_other_host_by_heartbeat_age(tmp_path, age_s, stale_after_s, taken):
    other = Holder("node-elsewhere", 4321, 1.0e9, "99", "2026-01-01T00:00:00+00:00")
    write_lock(tmp_path, other, age_s)
    if taken:
        with acquire(tmp_path, stale_after_s) as lock:
            assert lock.took_over == other and lock.took_over_why == f"no heartbeat for {age_s} s"
    else:
        with pytest.raises(RunDirInUse, match=r"pid 4321 on node-elsewhere \(SLURM job 99\) .* heartbeat 2 s ago"):
            acquire(tmp_path, stale_after_s)
        assert lock_pid(tmp_path) == 4321
    assert os.listdir(tmp_path) == ([] if taken else ["run.lock"])


@pytest.mark.slow
@pytest.mark.parametrize("stale", ["dead pid", "silent host"])
def test_race_of_takers_has_one_winner(tmp_path, stale):
    for round in range(3):
        run_dir, gate = tmp_path / f"run{round}", tmp_path / f"gate{round}"
        gate.mkdir()
        if stale == "dead pid":
            write_lock(run_dir, Holder(HOST, dead_pid(), 1.0, None, "2026-01-01T00:00:00+00:00"))
        else:
            write_lock(run_dir, Holder("node-elsewhere", 4321, 1.0e9, None, "2026-01-01T00:00:00+00:00"), 3600)
        procs = [subprocess.Popen([sys.executable, "-c", RACE, str(run_dir), str(gate / "go")], cwd=ROOT,
                                  env=subprocess_env(), stdout=subprocess.PIPE, text=True) for _ in range(8)]
        while len(list(gate.glob("ready.*"))) < len(procs):
            time.sleep(0.01)
        (gate / "go").touch()
        outcomes = {proc.pid: (proc.wait(timeout=20), proc.stdout.read().strip()) for proc in procs}
        winners = [pid for pid, (rc, _) in outcomes.items() if rc == 0]
        assert len(winners) == 1, outcomes
        assert [p.name for p in gate.glob("won.*")] == [f"won.{winners[0]}"]
        assert all((rc, out) == (3, str(winners[0])) for pid, (rc, out) in outcomes.items() if pid != winners[0])
        assert os.listdir(run_dir) == []  # the winner released; no guard, temp or moved file left


def test_lost_lock_is_detected_and_left_alone(tmp_path):
    lock = acquire(tmp_path)
    path = lock.path
    os.utime(path, (1e9, 1e9))
    lock.start_heartbeat(every_s=0.05)
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5  # the heartbeat refreshed it
    # Another job takes the lock over (as one on another host would, after a long silence).
    path.unlink()
    theirs = write_lock(tmp_path, Holder("node-elsewhere", 4321, 1.0e9, "78", "2026-01-01T00:00:00+00:00")).read_bytes()
    os.utime(path, (1e9, 1e9))
    time.sleep(0.3)
    assert not lock.still_ours()
    assert path.stat().st_mtime == 1e9  # our heartbeat no longer touches it
    lock.release()
    lock.release()
    assert path.read_bytes() == theirs


def test_release_removes_our_own_lock_once(tmp_path):
    lock = acquire(tmp_path)
    lock.release()
    assert not (tmp_path / "run.lock").exists() and not lock.still_ours()
    other = acquire(tmp_path)  # free again: no take-over
    assert other.took_over is None and other.took_over_why is None
    lock.release()
    assert other.still_ours()
    other.release()


def test_half_written_lock_is_waited_for(tmp_path):
    path = write_lock(tmp_path, None, data=b"")
    parent = psutil.Process(os.getppid())
    live = Holder(HOST, parent.pid, parent.create_time(), None, "2026-01-01T00:00:00+00:00")
    threading.Timer(0.5, lambda: path.write_bytes(json.dumps(asdict(live)).encode())).start()
    started = time.monotonic()
    with pytest.raises(RunDirInUse) as refused:
        acquire(tmp_path)
    assert refused.value.holder == live and time.monotonic() - started >= 0.4


@pytest.mark.parametrize("age_s", [run_lock.UNREADABLE_GRACE_S - 1, 60])
def test_unreadable_lock_is_stale_once_old(tmp_path, age_s):
    write_lock(tmp_path, None, age_s, data=b'{"host": "node')
    started = time.monotonic()
    with acquire(tmp_path) as lock:
        waited = time.monotonic() - started
        assert lock.took_over is None and "unreadable" in lock.took_over_why
    assert (0.7 < waited < 3) if age_s < run_lock.UNREADABLE_GRACE_S else waited < 0.5

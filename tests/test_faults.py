"""Faults a real cluster produces, injected for real: kill -9 at random moments, SIGTERM, a full
disk (a small tmpfs), a second launch into a live run, a hung process, damaged shards. Each is
held to what a user checks: the exit code, one line naming the cause, nothing lost (every
sample trained or recorded, earlier checkpoints intact, no step twice in TensorBoard)."""
from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROOT, subprocess_env
from safetensors.torch import load_file
from test_train import TINY, final_weights, launch, launch_command, metrics, scalars

# Two processes, 3 epochs of 12 updates, a checkpoint every 5 updates.
ARGS = [*TINY, "schedule.epochs=3", "data.workers=2", "ema.enabled=true", "train.checkpoint_every_steps=5",
        "train.log_every_steps=1"]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and all its descendants (torch's launcher puts ranks in new sessions)."""
    parent = psutil.Process(proc.pid)
    for p in [parent, *parent.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def same_weights(a: Path, b: Path) -> None:
    straight, other = final_weights(a), final_weights(b)
    assert straight.keys() == other.keys()
    for name in straight:
        torch.testing.assert_close(other[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)


def wait_for(condition, timeout: float = 300, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def steps_saved(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")
                  if (p / "trainer_state.json").is_file())


def start(processes: int, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(launch_command(processes, *args), cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted 2-process run every interrupted one must end identical to."""
    out = tmp_path_factory.mktemp("straight")
    launch(2, *ARGS, f"data.dir={tiny_data}", f"output_dir={out}", "name=straight", cwd=out)
    return out / "straight"


@pytest.mark.slow
def test_killed_at_random_moments_resumes_to_the_same_parameters(tiny_data, straight, tmp_path):
    """kill -9 of the launcher and both ranks at three random moments (mid-step, mid-checkpoint,
    mid-validation alike), then a resume each time: the end is the uninterrupted run's, and the
    killed run's lock on its directory is taken over."""
    # A checkpoint every 4 updates and kills within 1 s of one: three kills land before the end.
    args = [*ARGS, "train.checkpoint_every_steps=4", f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=killed"]
    run_dir, rng = tmp_path / "killed", random.Random(11)
    kills = []
    for _ in range(3):
        saved = steps_saved(run_dir) if run_dir.is_dir() else []
        proc = start(2, *args, cwd=tmp_path)
        # Progress first (a checkpoint newer than the last one), then a random moment after it.
        wait_for(lambda: len(steps_saved(run_dir)) > len(saved) or steps_saved(run_dir)[-1:] != saved[-1:],
                 what="a new checkpoint")
        time.sleep(rng.uniform(0, 1.0))
        kill_tree(proc)  # no warning: the launcher and both ranks die at once, as on a node failure
        proc.wait()
        kills.append(steps_saved(run_dir)[-1])
    assert kills[-1] < 36 and (run_dir / "run.lock").is_file()  # left behind by the killed job
    result = launch(2, *args, cwd=tmp_path)
    print(f"killed after checkpoints {kills}; resumed to the end")
    assert "resumed from" in result.stderr and "took over the run directory" in result.stderr
    same_weights(straight, run_dir)
    a, b = scalars(straight), scalars(run_dir)
    assert [s for s, _ in b["train/loss"]] == [s for s, _ in a["train/loss"]] == list(range(1, 37))
    assert [r["step"] for r in metrics(run_dir)] == [12, 24, 36]
    assert metrics(run_dir)[-1]["val_top1_error"] == pytest.approx(metrics(straight)[-1]["val_top1_error"])
    assert not (run_dir / "run.lock").exists()  # released at the end


@pytest.mark.slow
def test_sigterm_checkpoints_and_stops_without_requeue(tiny_data, straight, tmp_path):
    """SIGTERM to the launcher (as SLURM sends at the time limit, on preemption or scancel): it
    forwards it, both ranks stop at the same step and write its checkpoint; the run resumes."""
    args = [*ARGS, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=term"]
    run_dir = tmp_path / "term"
    proc = start(2, *args, cwd=tmp_path)
    wait_for(lambda: 5 in steps_saved(run_dir), what="checkpoint 5")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    stopped = [line for line in stderr.splitlines() if "stopped at step" in line]
    assert stopped and "on SIGTERM, checkpoint written; not requeued" in stopped[0], stderr[-3000:]
    step = int(stopped[0].split("stopped at step ")[1].split()[0])
    assert steps_saved(run_dir)[-1] == step and not list((run_dir / "checkpoints").glob(".tmp-*"))
    result = launch(2, *args, cwd=tmp_path)
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{step:08d}'}" in result.stderr
    same_weights(straight, run_dir)


@pytest.mark.slow
def test_sigterm_to_a_single_process_exits_143_after_its_checkpoint(tiny_data, tmp_path):
    """No launcher: ``python train.py`` itself gets the signal, and says so by its exit code."""
    args = [*ARGS, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=single"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: 5 in steps_saved(tmp_path / "single"), what="checkpoint 5")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "on SIGTERM, checkpoint written; not requeued" in stderr
    assert not (tmp_path / "single" / "run.lock").exists()


# ------------------------------------------------------------------------------------------ full disk
@pytest.fixture
def small_disk(tmpfs):
    return tmpfs("400m")


@pytest.mark.slow
def test_full_disk_during_a_checkpoint(tiny_data, small_disk, tmp_path):
    """The disk fills up while the second checkpoint is written: one line naming the path and
    the space it needed, exit code 4, the half-written directory removed, the first checkpoint
    intact; once space is freed the run resumes and ends as an uninterrupted one."""
    args = [*TINY, "schedule.epochs=1", "train.checkpoint_every_steps=8", f"data.dir={tiny_data}", "name=full"]
    command = [sys.executable, str(ROOT / "train.py"), *args]
    reference = subprocess.run([*command, f"output_dir={tmp_path}"], cwd=tmp_path, env=subprocess_env(),
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    checkpoint_mb = sum(f.stat().st_size for f in (tmp_path / "full/checkpoints/step-00000024").iterdir()) / 1e6
    ballast = small_disk / "ballast"  # fills the disk but for room for 1.5 checkpoints (and the logs)
    subprocess.run(["fallocate", "-l", f"{int(400 - 1.5 * checkpoint_mb - 2)}M", str(ballast)], check=True)
    command.append(f"output_dir={small_disk}")
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 4, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    run_dir = small_disk / "full"
    assert line.startswith(f"error: no space left on device writing checkpoint {run_dir}/checkpoints/step-00000016: "
                           f"it needs about {checkpoint_mb:.0f} MB"), line
    assert "earlier checkpoints are intact" in line and "Traceback" not in result.stderr
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert steps_saved(run_dir) == [8]
    assert load_file(run_dir / "checkpoints/step-00000008/model.safetensors")  # intact, loadable

    ballast.unlink()  # space freed
    resumed = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(step 8)" in resumed.stderr
    same_weights(tmp_path / "full", run_dir)
    assert [s for s, _ in scalars(run_dir)["train/loss"]] == [s for s, _ in scalars(tmp_path / "full")["train/loss"]]


# ------------------------------------------------------------------------------------------ run directory
@pytest.mark.slow
def test_a_second_launch_into_a_live_run_is_refused(tiny_data, tmp_path):
    args = [*ARGS, "schedule.epochs=20", f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=busy"]
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (tmp_path / "busy/checkpoints").is_dir(), what="the first run to start")
        second = launch_command(2, *args)
        result = subprocess.run(second, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        lines = error_lines(result.stderr)
        assert lines, result.stderr[-3000:]
        assert f"pid {first.pid} on {socket.gethostname()}" in lines[0] and "since" in lines[0]
        assert first.poll() is None  # the first run goes on, undisturbed
        events = list((tmp_path / "busy/tensorboard").rglob("events.out.tfevents.*"))
        assert len(events) == 1  # the refused launch wrote nothing
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143


# ------------------------------------------------------------------------------------------ hung process
@pytest.mark.slow
def test_a_hung_process_ends_the_job_within_the_collective_timeout(tiny_data, tmp_path):
    """Rank 1 stops answering (SIGSTOP, as a hung GPU or a dead node looks to the others): rank 0
    gives up after train.collective_timeout_s with one line saying so, and the job ends."""
    args = [*ARGS, "schedule.epochs=50", "train.collective_timeout_s=10", f"data.dir={tiny_data}",
            f"output_dir={tmp_path}", "name=hung"]
    proc = start(2, *args, cwd=tmp_path)
    wait_for(lambda: 5 in steps_saved(tmp_path / "hung"), what="checkpoint 5")
    # The ranks are the launcher's own children (their loader workers are theirs).
    (rank1,) = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
    rank1.suspend()
    stopped = time.time()
    try:
        _, stderr = proc.communicate(timeout=180)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank1.kill()  # stopped processes take no SIGTERM: the launcher SIGKILLs it after 30 s
        if proc.poll() is None:
            kill_tree(proc)
    elapsed = time.time() - stopped
    print(f"job ended {elapsed:.0f} s after rank 1 stopped answering (timeout 10 s)")
    assert proc.returncode != 0
    assert any("a collective operation timed out after 10 s (train.collective_timeout_s)" in line
               for line in error_lines(stderr)), stderr[-3000:]
    assert elapsed < 90  # the timeout, plus the launcher's 30 s grace before it kills the stopped rank
    # Rank 0 said where it waited before giving up (a stopped rank cannot say anything).
    report = stderr.split("process 0: no progress for ", 1)
    assert len(report) == 2 and "train.collective_timeout_s = 10 s); where its threads are:" in report[1], stderr[-3000:]
    assert "in train_and_validate" in report[1].split("a collective operation timed out")[0]


def wait_like_a_hung_loader(watch, reports: int) -> None:
    deadline = time.monotonic() + 120  # a guard: the report is due after 0.4 s
    while watch.reports < reports and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_stalled_process_prints_its_stacks_once_per_stall(capfd):
    from pipeline.ops.stall_watch import StallWatch

    with StallWatch(0.5, "process 3") as watch:
        wait_like_a_hung_loader(watch, reports=1)
        assert watch.reports == 1
        time.sleep(0.2)  # ten more checks of the same stall
        assert watch.reports == 1
        watch.beat()  # progress; then a new stall
        wait_like_a_hung_loader(watch, reports=2)
    err = capfd.readouterr().err
    assert watch.reports == 2 and err.count("process 3: no progress for ") == 2, err
    assert "(the processes waiting for it end the job after train.collective_timeout_s = 0.5 s)" in err
    assert err.count(", line ") >= 4 and "in wait_like_a_hung_loader" in err  # every thread's stack
    assert "in test_a_stalled_process_prints_its_stacks_once_per_stall" in err
    with StallWatch(0.5, "process 0", alone=True) as watch:  # a one-process run: nobody else ends it
        wait_like_a_hung_loader(watch, reports=1)
    assert "(train.collective_timeout_s = 0.5 s; no other process waits for it)" in capfd.readouterr().err


@pytest.mark.parametrize("text", [
    "Application timeout caused pair closure",  # gloo, from DDP's all-reduce in backward
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error ... Operation timed out",
    "Timed out waiting 10000ms for send operation to complete",  # gloo's collective, via DistError
])
def test_timeouts_of_every_collective_kind_get_the_same_line(text):
    from pipeline.ops.launch import collective_failure
    exc = RuntimeError(text) if "waiting" not in text else torch.distributed.DistError(text)
    message = collective_failure(exc, 10)
    assert message and message.startswith("a collective operation timed out after 10 s (train.collective_timeout_s)")
    assert collective_failure(RuntimeError("CUDA out of memory; allocation timed out"), 10) is None


# ------------------------------------------------------------------------------------------ damaged shards
def zero_middle(path: Path) -> None:
    data = path.read_bytes()
    start, stop = len(data) * 2 // 5 // 512 * 512, len(data) * 3 // 5
    path.write_bytes(data[:start] + bytes(stop - start) + data[stop:])


@pytest.fixture(scope="module")
def damaged_data(tiny_data, tmp_path_factory) -> Path:
    """The tiny data with a training shard zeroed in its middle after preparation."""
    copy = tmp_path_factory.mktemp("damaged") / "shards"
    shutil.copytree(tiny_data, copy)
    zero_middle(copy / "train-000003.tar")
    return copy


def train_single(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_damaged_shard_stops_the_run_naming_shard_sample_and_fix(damaged_data, tmp_path):
    result = train_single(f"data.dir={damaged_data}", "schedule.epochs=1", f"output_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: {damaged_data / 'train-000003.tar'}: train sample ")
    assert f"python -m data_prep verify {damaged_data}" in line and "data.on_bad_sample=skip" in line
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_skipping_records_every_bad_sample_and_keeps_ranks_in_step(damaged_data, tmp_path):
    """Two processes train on: every sample of each epoch is trained or recorded (once), the
    records are in skipped_samples.jsonl and TensorBoard, and the replicas stay identical."""
    result = launch(2, *ARGS, f"data.dir={damaged_data}", "data.on_bad_sample=skip", "data.max_skipped_fraction=0.2",
                    f"output_dir={tmp_path}", "name=skip", cwd=tmp_path)
    run_dir = tmp_path / "skip"
    assert "parameters identical on all 2 processes" in result.stderr
    records = [json.loads(line) for line in (run_dir / "skipped_samples.jsonl").read_text().splitlines()]
    assert records and all(r["shard"] == str(damaged_data / "train-000003.tar") for r in records)
    per_epoch = {}
    for r in records:
        per_epoch.setdefault(r["epoch"], []).append(r)
    epoch_images = 12 * 2 * 4  # updates x processes x batch
    for record in metrics(run_dir):
        skipped = per_epoch.get(record["epoch"], [])
        assert len({(r["shard"], r["index"]) for r in skipped}) == len(skipped)  # none recorded twice
        assert record["train_samples"] + len(skipped) == epoch_images
    assert scalars(run_dir)["data/skipped_samples"][-1][1] == len(records)


@pytest.mark.slow
def test_too_many_skipped_samples_stop_the_run(damaged_data, tmp_path):
    result = train_single(f"data.dir={damaged_data}", "data.on_bad_sample=skip", "data.max_skipped_fraction=0.01",
                          "schedule.epochs=1", f"output_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert "training samples skipped in this epoch, over data.max_skipped_fraction=0.01" in line
    assert str(tmp_path / "demo" / "skipped_samples.jsonl") in line

"""A tracker lost while a run trains, with the real servers: a ``mlflow server`` process (SQLite
store) and an ``aim server`` on 127.0.0.1, killed mid-run or down from the start, and W&B's own
service process (offline) killed mid-run. The tracker is named in one warning before the next
epoch line, training goes on, the process ends within the stated bound after training, and
what the tracker missed reaches it later exactly once, from the run's TensorBoard events: by
``python -m pipeline.train.trackers sync RUN_DIR`` (run again: nothing twice) or by a resume.
Each is read back with the tracker's own client."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_trackers import THROUGHPUT, aim_runs, tracker_env, wait_for_server, wandb_runs, warnings
from test_train import TINY, free_port, scalars

from pipeline.train import trackers

pytest.importorskip("mlflow")
pytest.importorskip("wandb")
pytest.importorskip("aim")
# MLflow's SQLite store, read back here, with SQLAlchemy 2.1
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

JOB_TIMEOUT_S = 600
# 96 training images in batches of 16: 6 updates an epoch, a log line every 2; the first job stops
# at step 10 (its second validation), a resume goes on to step 12.
ARGS = [*TINY, "data.batch_size=16", "train.image_grid=false", "schedule.epochs=2"]
FIRST_STEPS, RESUMED_STEPS = 10, 12
# The end of the run after training: the tracker's bound plus the process's own teardown
# (closing TensorBoard, the interpreter's exit), generously.
EXIT_MARGIN_S = 30.0

# On PYTHONPATH of a job whose tracker is lost mid-run: its next validation waits until the
# trainers' state file records the tracker as set aside, at most the client's retry time (from
# the environment the job gets) plus a margin, so that the epoch line cannot come first merely
# because this machine trains fast. The test asserts the warning comes before that line.
HOLD_NEXT_VALIDATION = """
import json, os, pathlib, time
import pipeline.train.validate as module

original, calls = module.validate, []

def validate(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        state, deadline = pathlib.Path(os.environ["TRACKER_STATE"]), time.monotonic() + float(os.environ["HOLD_S"])
        name = os.environ["LOST_TRACKER"]
        while time.monotonic() < deadline:
            if state.is_file() and "behind" in json.loads(state.read_text() or "{}").get(name, {}):
                break
            time.sleep(0.1)
    return original(*args, **kwargs)

module.validate = validate
"""


def client_retry_s(env: dict) -> float:
    """The longest MLflow's client can take to give up on a refused connection: its backoffs
    (factor x 2^(n-1) from the second retry on) plus a jitter of at most 1 s each."""
    retries = int(env.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", trackers.CLIENT_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]))
    factor = float(env.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                           trackers.CLIENT_LIMITS["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]))
    return sum(factor * 2 ** (n - 1) for n in range(2, retries + 1)) + retries


class Server:
    """A tracking server process on 127.0.0.1, killed and restarted on the same port and store."""

    def __init__(self, command: list[str], port: int, cwd: Path, env: dict, ready: str):
        self.command, self.port, self.cwd, self.env, self.ready = command, port, cwd, env, ready
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        with open(self.cwd / f"server-{self.port}.log", "a") as log:
            self.process = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_server(self.port, self.ready)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def mlflow_server(tmp_path: Path, env: dict) -> Server:
    port = free_port()
    return Server([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                   "--default-artifact-root", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port",
                   str(port), "--workers", "1"], port, tmp_path, env, "/health")


def aim_server(tmp_path: Path, env: dict) -> Server:
    repo = tmp_path / "aim-server"
    repo.mkdir()
    aim = str(Path(sys.executable).with_name("aim"))
    subprocess.run([aim, "init", "--repo", str(repo), "-y"], env=env, check=True, capture_output=True, timeout=JOB_TIMEOUT_S)
    port = free_port()
    return Server([aim, "server", "--repo", str(repo), "--host", "127.0.0.1", "--port", str(port)], port, tmp_path,
                  env, "/status/")


class Job:
    """train.py in a process of its own, each line of its stderr timestamped as it arrives (the
    progress bar's carriage returns count as line ends)."""

    def __init__(self, args: list[str], cwd: Path, env: dict):
        self.process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.exited_at = None

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self) -> Job:
        self.process.wait(JOB_TIMEOUT_S)
        self.exited_at = time.monotonic()
        self.reader.join()
        return self

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, pattern: str) -> tuple[int, float]:
        """The index and arrival time of the first line matching ``pattern``."""
        for index, (at, line) in enumerate(self.lines):
            if re.match(pattern, line):
                return index, at
        raise AssertionError(f"no line matches {pattern!r}:\n{self.stderr[-3000:]}")


def wait_for_first_epoch(job: Job, run_dir: Path) -> None:
    """Until metrics.jsonl has the first epoch's line (the job has logged it to its trackers)."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert job.process.poll() is None and time.monotonic() < deadline, job.stderr[-3000:]
        time.sleep(0.1)


def sync(run_dir: Path, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline.train.trackers", "sync", str(run_dir)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr[-3000:]
    return result


def sent(result: subprocess.CompletedProcess, name: str) -> int:
    """How many values sync says it sent to ``name``."""
    found = re.search(rf"^{name}: sent (\d+) values? it had missed", result.stdout, re.MULTILINE)
    assert found, result.stdout + result.stderr[-3000:]
    return int(found.group(1))


def mlflow_history(uri: str, run_id: str) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    return run.info.status, {tag: [(m.step, m.value) for m in client.get_metric_history(run_id, tag)]
                             for tag in run.data.metrics}


def assert_every_scalar_once(got: dict, board: dict, name: str, redone_throughput: int | None = None) -> None:
    """``got`` has each scalar of TensorBoard at each of its steps, once, with its value."""
    assert set(got) == set(board), (name, set(got) ^ set(board))
    for tag, points in board.items():
        steps = sorted(step for step, _ in got[tag])
        assert steps == [step for step, _ in points], (name, tag, steps)
        for step, value in got[tag]:
            if tag in THROUGHPUT and step == redone_throughput:
                continue
            assert value == pytest.approx(dict(points)[step], rel=1e-5, abs=1e-7), (name, tag, step)


def values_in(board: dict, above: dict | None = None) -> int:
    return sum(1 for tag, points in board.items() for step, _ in points if step > (above or {}).get(tag, -1))


def lose_mid_run(tmp_path: Path, env: dict, data: Path, tracker: str, kill) -> tuple[Job, float]:
    """A job logging to ``tracker``, which ``kill(job)`` loses once the first epoch is logged;
    the job's second validation waits for the tracker to be set aside (HOLD_NEXT_VALIDATION)."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOLD_NEXT_VALIDATION)
    run_dir = tmp_path / "lost"
    job_env = {**env, "PYTHONPATH": f"{hook}{os.pathsep}{env['PYTHONPATH']}", "LOST_TRACKER": tracker,
               "TRACKER_STATE": str(run_dir / "trackers.json"), "HOLD_S": str(client_retry_s(env) + 60)}
    job = Job([*ARGS, f"data.dir={data}", f"output_dir={tmp_path}", "name=lost", f"train.log_with=[tensorboard,{tracker}]",
               f"train.max_steps={FIRST_STEPS}"], tmp_path, job_env)
    try:
        wait_for_first_epoch(job, run_dir)
        kill(job)
        killed_at = time.monotonic()
        job.wait()
    finally:
        if job.process.poll() is None:
            job.process.kill()
    return job, killed_at


def assert_lost_once_and_ended_promptly(job: Job, killed_at: float, tracker: str) -> None:
    """One warning, before the next epoch line; the process's end within the stated bound."""
    assert job.process.returncode == 0 and "Traceback" not in job.stderr, job.stderr[-4000:]
    warning_index, warned_at = job.first(rf"warning: {tracker}: ")
    epoch_index, _ = job.first(r"epoch [\d.]+: step 10,")
    _, done_at = job.first(r"done in ")
    lines = warnings(job.stderr)
    print(f"\n{tracker}: warning {warned_at - killed_at:.1f} s after the server died; "
          f"exit {job.exited_at - done_at:.1f} s after training was done\n{lines}")
    assert len(lines) == 1 and "off for the rest of the run" in lines[0], lines
    assert "python -m pipeline.train.trackers sync" in lines[0], lines
    assert warning_index < epoch_index, job.stderr[-4000:]
    assert job.exited_at - done_at < trackers.DOWN_AFTER_S + EXIT_MARGIN_S


# ------------------------------------------------------------------------------------------ MLflow
@pytest.mark.slow
def test_an_mlflow_server_lost_mid_run_then_sync_delivers_what_it_missed_once(tiny_data, tmp_path):
    """Killed once the first epoch (step 6) is logged; restarted on its database; sync sends
    steps 8-10, a second sync (from the same state) nothing more, and a resume goes on."""
    env = tracker_env(tmp_path)
    server = mlflow_server(tmp_path, env).start()
    uri = f"http://127.0.0.1:{server.port}"
    env.update(MLFLOW_TRACKING_URI=uri)
    try:
        job, killed_at = lose_mid_run(tmp_path, env, tiny_data, "mlflow", lambda job: server.kill())
        run_dir = tmp_path / "lost"
        assert_lost_once_and_ended_promptly(job, killed_at, "mlflow")
        run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]

        server.start()  # the same database
        status, before = mlflow_history(uri, run_id)
        assert status == "RUNNING" and max(step for points in before.values() for step, _ in points) <= 6
        board = scalars(run_dir)
        state_before_sync = (run_dir / "trackers.json").read_text()
        first = sync(run_dir, tmp_path, env)
        assert sent(first, "mlflow") == values_in(board) - sum(map(len, before.values())), first.stdout
        status, after = mlflow_history(uri, run_id)
        assert status == "FINISHED"
        assert_every_scalar_once(after, board, "mlflow")

        (run_dir / "trackers.json").write_text(state_before_sync)  # as if the first sync had died before saving
        again = sync(run_dir, tmp_path, env)
        assert sent(again, "mlflow") == 0 and mlflow_history(uri, run_id) == ("FINISHED", after), again.stdout
        assert sync(run_dir, tmp_path, env).stdout.strip() == "mlflow: nothing missed"

        resumed = Job([*ARGS, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=lost", "train.log_with=[tensorboard,mlflow]",
                       f"train.max_steps={RESUMED_STEPS}"], tmp_path, env).wait()
        assert resumed.process.returncode == 0 and not warnings(resumed.stderr), resumed.stderr[-3000:]
        status, final = mlflow_history(uri, run_id)
        assert status == "FINISHED"
        assert_every_scalar_once(final, scalars(run_dir), "mlflow")
    finally:
        server.kill()


@pytest.mark.slow
def test_an_mlflow_server_lost_mid_run_gets_what_it_missed_from_the_resume(tiny_data, tmp_path):
    """Killed once the first epoch is logged; restarted; the resume sends steps 8-10 from the
    first job's TensorBoard events, then its own steps 11-12, each once."""
    env = tracker_env(tmp_path)
    server = mlflow_server(tmp_path, env).start()
    uri = f"http://127.0.0.1:{server.port}"
    env.update(MLFLOW_TRACKING_URI=uri)
    try:
        job, _ = lose_mid_run(tmp_path, env, tiny_data, "mlflow", lambda job: server.kill())
        assert job.process.returncode == 0 and len(warnings(job.stderr)) == 1, job.stderr[-3000:]
        run_dir = tmp_path / "lost"
        run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
        board = scalars(run_dir)
        missed = values_in(board, {tag: 5 for tag in board})  # those of steps 6-10, at most

        server.start()
        resumed = Job([*ARGS, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=lost",
                       "train.log_with=[tensorboard,mlflow]", f"train.max_steps={RESUMED_STEPS}"], tmp_path, env).wait()
        assert resumed.process.returncode == 0 and not warnings(resumed.stderr), resumed.stderr[-3000:]
        caught_up = re.search(r"^mlflow: sent (\d+) values? it had missed", resumed.stderr, re.MULTILINE)
        assert caught_up and 0 < int(caught_up.group(1)) <= missed, resumed.stderr[-3000:]
        status, got = mlflow_history(uri, run_id)
        assert status == "FINISHED"
        assert_every_scalar_once(got, scalars(run_dir), "mlflow")
        assert sync(run_dir, tmp_path, env).stdout.strip() == "mlflow: nothing missed"
    finally:
        server.kill()


@pytest.mark.slow
def test_an_mlflow_server_down_from_the_start_gets_the_whole_run_from_sync(tiny_data, tmp_path):
    """Nothing listens when the run starts: one line, the run trains to the end; then the server
    starts and sync creates the MLflow run, with the run's parameters and every scalar."""
    env = tracker_env(tmp_path)
    server = mlflow_server(tmp_path, env)  # not started yet
    uri = f"http://127.0.0.1:{server.port}"
    env.update(MLFLOW_TRACKING_URI=uri)
    job = Job([*ARGS, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=down",
               "train.log_with=[tensorboard,mlflow]", "train.max_steps=6"], tmp_path, env).wait()
    assert job.process.returncode == 0 and "Traceback" not in job.stderr, job.stderr[-3000:]
    lines = warnings(job.stderr)
    assert len(lines) == 1 and lines[0].startswith("warning: mlflow: cannot start ("), lines
    _, done_at = job.first(r"done in ")
    assert job.exited_at - done_at < trackers.DOWN_AFTER_S + EXIT_MARGIN_S
    run_dir = tmp_path / "down"
    board = scalars(run_dir)
    try:
        server.start()
        result = sync(run_dir, tmp_path, env)
        assert sent(result, "mlflow") == values_in(board), result.stdout
        run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
        status, got = mlflow_history(uri, run_id)
        assert status == "FINISHED"
        assert_every_scalar_once(got, board, "mlflow")
        from mlflow.tracking import MlflowClient

        run = MlflowClient(uri).get_run(run_id)
        assert run.info.run_name == "down" and run.data.params["train.max_steps"] == "6"
    finally:
        server.kill()


FAIL_IN_VALIDATION = """
import pipeline.train.validate as module

def validate(*args, **kwargs):
    raise RuntimeError("validation failed on purpose")

module.validate = validate
"""


@pytest.mark.slow
def test_a_failed_training_ends_the_trackers_runs_failed_and_so_does_sync(tiny_data, tmp_path):
    """The first validation raises: W&B (offline, answering) closes its run with exit code 1 at
    once; MLflow, whose server was down from the start, gets the run from sync, which ends it
    FAILED."""
    from test_trackers import wandb_records

    env = tracker_env(tmp_path)
    server = mlflow_server(tmp_path, env)  # not started yet
    uri = f"http://127.0.0.1:{server.port}"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_IN_VALIDATION)
    job = Job([*ARGS, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=failed", "train.max_steps=6",
               "train.log_with=[tensorboard,mlflow,wandb]"], tmp_path,
              {**env, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": f"{hook}{os.pathsep}{env['PYTHONPATH']}"}).wait()
    assert job.process.returncode != 0 and "validation failed on purpose" in job.stderr, job.stderr[-3000:]
    run_dir = tmp_path / "failed"
    exits = [record.exit.exit_code for path in run_dir.glob("wandb/offline-run-*/run-*.wandb")
             for record in wandb_records(path) if record.WhichOneof("record_type") == "exit"]
    assert exits == [1]
    try:
        server.start()
        env.update(MLFLOW_TRACKING_URI=uri)
        result = sync(run_dir, tmp_path, env)
        assert re.search(r"^mlflow: sent \d+ values it had missed .*; its run ended FAILED$", result.stdout, re.MULTILINE)
        assert "wandb: nothing missed" in result.stdout, result.stdout
        status, got = mlflow_history(uri, json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"])
        assert status == "FAILED"
        assert_every_scalar_once(got, scalars(run_dir), "mlflow")
    finally:
        server.kill()


# ------------------------------------------------------------------------------- W&B and Aim
def wandb_history(run_dir: Path) -> tuple[set, dict]:
    """Every offline run file of the run: their run ids, and each scalar's (step, value)s. The
    killed service's file can hold nothing at all (W&B writes it 32 KiB at a time): left out."""
    runs = [run for run in wandb_runs(run_dir) if run["id"] is not None]
    history: dict = {}
    for run in runs:
        for tag, points in run["history"].items():
            history.setdefault(tag, []).extend(points)
    return {run["id"] for run in runs}, history


def kill_wandb_service(job: Job) -> None:
    import psutil

    services = [p for p in psutil.Process(job.process.pid).children(recursive=True) if p.name() == "wandb-core"]
    assert services, job.stderr[-3000:]
    for service in services:
        service.kill()


@pytest.mark.slow
def test_wandb_losing_its_service_mid_run_then_sync_writes_what_it_missed_once(tiny_data, tmp_path):
    """Offline W&B: its service process (which writes the run file) is killed once the first
    epoch is logged; sync writes the missed steps to a new offline folder of the same run, which
    ``wandb sync`` uploads with the others; a second sync from the same state writes nothing."""
    env = tracker_env(tmp_path)
    job, killed_at = lose_mid_run(tmp_path, env, tiny_data, "wandb", kill_wandb_service)
    run_dir = tmp_path / "lost"
    assert_lost_once_and_ended_promptly(job, killed_at, "wandb")
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]["id"]
    board = scalars(run_dir)
    state_before_sync = (run_dir / "trackers.json").read_text()
    result = sync(run_dir, tmp_path, env)
    assert "wandb sync" in result.stdout, result.stdout
    ids, history = wandb_history(run_dir)
    assert ids == {run_id}
    assert_every_scalar_once(history, board, "wandb")
    (run_dir / "trackers.json").write_text(state_before_sync)
    assert sent(sync(run_dir, tmp_path, env), "wandb") == 0
    assert wandb_history(run_dir) == (ids, history)


@pytest.mark.slow
def test_an_aim_server_lost_mid_run_then_sync_delivers_what_it_missed_once(tiny_data, tmp_path):
    """A remote Aim repository (``aim://``) whose server is killed once the first epoch is
    logged: Aim's client would retry forever and hold the process at exit; here one warning, a
    prompt exit, and sync delivers the rest once the server is back (read with aim.Repo)."""
    env = tracker_env(tmp_path)
    server = aim_server(tmp_path, env).start()
    env.update(AIM_REPO=f"aim://127.0.0.1:{server.port}")
    try:
        job, killed_at = lose_mid_run(tmp_path, env, tiny_data, "aim", lambda job: server.kill())
        assert_lost_once_and_ended_promptly(job, killed_at, "aim")
        run_dir = tmp_path / "lost"
        board = scalars(run_dir)
        server.start()
        state_before_sync = (run_dir / "trackers.json").read_text()
        sync(run_dir, tmp_path, env)
        (run_dir / "trackers.json").write_text(state_before_sync)
        assert sent(sync(run_dir, tmp_path, env), "aim") == 0
    finally:
        server.kill()
    run_hash = json.loads((run_dir / "trackers.json").read_text())["aim"]["run_hash"]
    shutil.copytree(tmp_path / "aim-server", tmp_path / "read" / "aim")  # aim_runs reads RUN_DIR/aim
    (run, got), = aim_runs(tmp_path / "read")
    assert run.hash == run_hash and run.name == "lost"
    assert_every_scalar_once(got, board, "aim")


# ---------------------------------------------------------------------------------------------------
def test_the_client_limits_are_defaults_that_the_environment_overrides(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "42")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    trackers.limit_clients()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "42"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == trackers.CLIENT_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


def test_sync_of_a_directory_that_is_not_a_run_is_one_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.train.trackers", "sync", str(tmp_path / "nowhere")],
                            cwd=tmp_path, env=tracker_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere' / 'trackers.json'}: not found; "
                                                  f"sync needs a run directory whose trackers logged to MLflow, W&B or Aim"]

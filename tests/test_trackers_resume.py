"""A job killed while it validates: its last checkpoint comes before that validation, so the
resume validates the epoch again, and MLflow, W&B and Aim get its values once each, those that
TensorBoard holds, although they already had the epoch's training values at the same step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_trackers import THROUGHPUT, aim_runs, mlflow_runs, tracker_env, wandb_runs, warnings
from test_train import TINY, scalars

# MLflow's SQLite store, read back here, with SQLAlchemy 2.1
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")]

JOB_TIMEOUT_S = 600  # as the other trackers' tests give a job

# Put on PYTHONPATH of the first job only: validation says it started, then waits to be killed.
HOLD_IN_VALIDATION = """
import os, pathlib, time
import pipeline.train.validate as module

def validate(*args, **kwargs):
    pathlib.Path(os.environ["VALIDATING_MARK"]).touch()
    time.sleep(3600)

module.validate = validate
"""


def mlflow_steps(run_dir: Path, tag: str) -> list[int]:
    """The steps of ``tag`` in the run's MLflow store so far ([] before the trackers started)."""
    from mlflow.tracking import MlflowClient

    state = run_dir / "trackers.json"
    run_id = json.loads(state.read_text()).get("mlflow", {}).get("run_id") if state.is_file() else None
    if run_id is None:
        return []
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    return [m.step for m in client.get_metric_history(run_id, tag)]


def test_a_job_killed_while_validating_sends_that_validation_on_resume(tiny_data, tmp_path):
    """4 updates an epoch, 2 epochs, a checkpoint at step 2. The first job is killed (SIGKILL)
    while it validates the first epoch (step 4), once MLflow has step 4's training values;
    the resume from step 2 redoes steps 3-4 and that validation, then trains the second epoch."""
    run_dir, mark = tmp_path / "killed", tmp_path / "validating"
    command = [sys.executable, str(ROOT / "train.py"), *TINY, f"data.dir={tiny_data}", f"output_dir={tmp_path}",
               "name=killed", "data.batch_size=24", "schedule.epochs=2", "train.checkpoint_every_steps=2",
               "train.image_grid=false",
               "train.log_with=[tensorboard,wandb,aim,mlflow]"]
    # Only MLflow's store is read while the job runs. Each tracker has its own thread, so W&B and Aim
    # may lag at the kill (even be creating their stores): the resume sends them what they lack.
    env = tracker_env(tmp_path)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_IN_VALIDATION)
    held_env = {**env, "PYTHONPATH": f"{hook}{os.pathsep}{env['PYTHONPATH']}", "VALIDATING_MARK": str(mark)}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=tmp_path, env=held_env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (mark.exists() and 4 in mlflow_steps(run_dir, "train/loss")):
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)  # the job and its helpers (loader workers, W&B's service) at once
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert not (run_dir / "checkpoints" / "step-00000004").exists()

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert second.returncode == 0 and "Traceback" not in second.stderr, second.stderr[-4000:]
    assert "(step 2)" in second.stderr and not warnings(second.stderr), second.stderr[-3000:]

    board = scalars(run_dir)  # TensorBoard: the first job's step 2, then the resume's
    assert [s for s, _ in board["train/loss"]] == [2, 4, 6, 8]
    assert [s for s, _ in board["val/top1_error"]] == [4, 8]
    (_, mlflow_metrics), = mlflow_runs(run_dir)
    wandb_metrics: dict = {}
    for job in wandb_runs(run_dir):  # a run file per job, one run
        for tag, points in job["history"].items():
            wandb_metrics.setdefault(tag, []).extend(points)
    (_, aim_metrics), = aim_runs(run_dir)
    for name, got in (("mlflow", mlflow_metrics), ("aim", aim_metrics), ("wandb", wandb_metrics)):
        for tag, points in board.items():
            steps, expected = sorted(s for s, _ in got.get(tag, [])), [s for s, _ in points]
            assert steps == sorted(set(steps)), (name, tag)  # each step once
            if name == "wandb" and not tag.startswith("val"):
                # W&B writes its offline run file 32 KiB at a time, and a killed job's tail is lost:
                # here all that the first job sent (its steps 0-4), everything the resume sent is there.
                assert {s for s in expected if s > 4} <= set(steps) <= set(expected), (name, tag)
            else:
                assert steps == expected, (name, tag)
            for step, value in got.get(tag, []):
                if tag in THROUGHPUT and step == 4:
                    continue  # TensorBoard shows the resume's redone step 4, the others the first job's
                assert value == pytest.approx(dict(points)[step], rel=1e-4, abs=1e-6), (name, tag, step)
        assert set(got) <= set(board), name  # nothing else


LEGACY_STATE = """
import json, sys
from pipeline.config import load_config
from pipeline.train.trackers import STATE_FILE, Trackers

config = load_config(None, sys.argv[1:])
config.run_dir.mkdir(parents=True)
(config.run_dir / STATE_FILE).write_text(json.dumps({"logged_through": 4}))  # as the earlier version kept it
trackers = Trackers(config, None, ["mlflow"])
trackers.log({"train/loss": 0.5}, step=2)
trackers.log({"train/loss": 0.25}, step=4)
trackers.log({"val/loss": 0.75}, step=4)
trackers.log({"train/loss": 0.125}, step=6)
trackers.finish()
"""


def test_a_trackers_file_of_the_earlier_version_still_holds_back_the_steps_it_covers(tmp_path):
    """Its one ``logged_through`` step covered every scalar: a resume sends none at or below it."""
    result = subprocess.run([sys.executable, "-c", LEGACY_STATE, f"output_dir={tmp_path}", "name=legacy",
                             "train.log_with=[mlflow]"], cwd=tmp_path, env=tracker_env(tmp_path),
                            capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0 and not warnings(result.stderr), result.stderr[-3000:]
    (_, metrics), = mlflow_runs(tmp_path / "legacy")
    assert metrics == {"train/loss": [(6, 0.125)]}
    state = json.loads((tmp_path / "legacy" / "trackers.json").read_text())
    assert state["logged_through"] == 4 and state["sent_through"] == {"train/loss": 6}


CUT_SHORT_AIM = """
import os, sys
from aim import Repo
from pipeline.config import load_config
from pipeline.train.trackers import Trackers

config = load_config(None, sys.argv[2:])
if sys.argv[1] == "first":  # a job killed while Aim created its repository: no VERSION yet
    Repo.from_path(str(config.run_dir / "aim"), init=True)
    os.remove(config.run_dir / "aim" / ".aim" / "VERSION")
    sys.exit()
trackers = Trackers(config, None, ["aim"])
trackers.log({"train/loss": 0.5}, step=2)
trackers.finish()
"""


def test_an_aim_repository_whose_creation_was_cut_short_is_completed_by_the_next_job(tmp_path):
    """Aim writes its repository's VERSION last; a job killed before that left a repository Aim
    itself calls out of date for ever after. The run's own repository is completed instead."""
    args = [f"output_dir={tmp_path}", "name=cut", "train.log_with=[aim]"]
    for job in ("first", "second"):
        result = subprocess.run([sys.executable, "-c", CUT_SHORT_AIM, job, *args], cwd=tmp_path,
                                env=tracker_env(tmp_path), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
        assert result.returncode == 0 and not warnings(result.stderr), result.stderr[-3000:]
    (_, metrics), = aim_runs(tmp_path / "cut")
    assert metrics == {"train/loss": [(2, 0.5)]}

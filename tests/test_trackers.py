"""The trackers besides TensorBoard (``train.log_with``), for real and offline, each read back with
its own client: MLflow's SQLite store in the run directory with ``MlflowClient``, W&B's offline
run files through wandb's protobuf records, Aim's repository with ``aim.Repo``. A resume continues
each tracker's run without sending a step twice; a tracker that cannot be reached (at the start,
or later) is one warning and training goes on; one not installed is one error naming its extra;
no secret reaches the run directory."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, subprocess_env
from test_train import TINY, free_port, launch_command, scalars

pytest.importorskip("mlflow")
pytest.importorskip("wandb")
pytest.importorskip("aim")
# MLflow's SQLite store, read back here, with SQLAlchemy 2.1
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

ALL = "train.log_with=[tensorboard,mlflow,wandb,aim]"
API_KEY = "wandb-key-0123456789abcdef0123456789abcdef01234567"  # a made-up W&B API key
PASSWORD = "pw-s3cret-9f8e7d"  # a made-up password in MLflow's tracking URI
THROUGHPUT = ("throughput/images_per_sec", "throughput/data_wait_fraction")  # the clock's, differ when redone


def tracker_env(tmp_path: Path, **extra: str) -> dict:
    """Offline W&B with its home folders in ``tmp_path``, and no tracker settings from outside."""
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(("MLFLOW_", "WANDB_", "AIM_"))}
    home = tmp_path / "wandb-home"
    env.update(WANDB_MODE="offline", WANDB_API_KEY=API_KEY, WANDB_CONFIG_DIR=str(home / "config"),
               WANDB_CACHE_DIR=str(home / "cache"), WANDB_DATA_DIR=str(home / "data"), **extra)
    return env


def train(processes: int, *args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(launch_command(processes, *args), cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    return result


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("warning:")]


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


# ------------------------------------------------------------------------------ each tracker's own reader
def mlflow_runs(run_dir: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    return [(run, {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                   for key in run.data.metrics})
            for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]


def wandb_records(path: Path):
    """The records of a W&B run file (``run-ID.wandb``): LevelDB's log format (32 KiB blocks of
    checksummed chunks) after a 7-byte header, each record one of wandb's protobuf ``Record``s."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad chunk at {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first / middle, last
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            yield record


def wandb_runs(run_dir: Path) -> list[dict]:
    """Per run file, oldest first: its run id, config and history ({key: [(step, value)]})."""
    runs = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"id": None, "config": {}, "history": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
            elif kind == "config":
                run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):  # _step, _runtime, _timestamp: its own
                        run["history"].setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
        runs.append(run)
    return runs


def aim_runs(run_dir: Path) -> list:
    from aim import Repo
    from aim.sdk.index_manager import RepoIndexManager

    repo = Repo.from_path(str(run_dir / "aim"))
    for run_hash in repo.list_all_runs():  # what Aim's UI does in the background
        RepoIndexManager.get_index_manager(repo).index(run_hash)
    return [(run, {metric.name: [(step, value) for step, (value, *_) in metric.data.items()]
                   for metric in run.metrics()}) for run in Repo.from_path(str(run_dir / "aim")).iter_runs()]


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_every_scalar_reaches_every_tracker_and_a_resume_continues_their_runs(tiny_data, tmp_path):
    """Two processes, 6 updates an epoch: the first job stops at step 6 (the epoch's end), then its
    last checkpoint is removed, as if it had been killed after logging step 6 but before saving it;
    the resume from step 4 redoes steps 5-6 and goes on to step 10."""
    env = tracker_env(tmp_path)
    args = [*TINY, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=all", ALL, "data.batch_size=8",
            "train.checkpoint_every_steps=2", "train.image_grid=false"]
    first = train(2, *args, "train.max_steps=6", cwd=tmp_path, env=env)
    run_dir = tmp_path / "all"
    saved = json.loads((run_dir / "trackers.json").read_text())
    assert set(saved) == {"mlflow", "wandb", "aim", "sent_through"}
    assert saved["sent_through"]["train/loss"] == saved["sent_through"]["val/top1_error"] == 6
    assert saved["sent_through"]["recipe/lr"] == 0
    for name in ("mlflow", "wandb", "aim"):
        assert f"{name}: logging to run" in first.stderr
    assert not warnings(first.stderr), warnings(first.stderr)
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")
    second = train(2, *args, "train.max_steps=10", cwd=tmp_path, env=env)
    assert "(step 4)" in second.stderr and not warnings(second.stderr), second.stderr[-3000:]
    resumed = {tag: 0 if tag.startswith("recipe/") else 10 for tag in saved["sent_through"]}
    assert json.loads((run_dir / "trackers.json").read_text()) == {**saved, "sent_through": resumed}

    board = scalars(run_dir)  # TensorBoard: the first job's steps up to 4, then the resume's
    assert [s for s, _ in board["train/loss"]] == [2, 4, 6, 8, 10]
    assert [s for s, _ in board["val/top1_error"]] == [6, 10]
    assert [s for s, _ in board["recipe/lr"]] == [0]

    (mlflow_run, mlflow_metrics), = mlflow_runs(run_dir)  # one run each, continued by the resume
    assert mlflow_run.info.run_id == saved["mlflow"]["run_id"] and mlflow_run.info.run_name == "all"
    wandb_files = wandb_runs(run_dir)
    assert [w["id"] for w in wandb_files] == [saved["wandb"]["id"]] * 2  # a run file per job, one run
    wandb_metrics: dict = {}
    for w in wandb_files:
        for key, points in w["history"].items():
            wandb_metrics.setdefault(key, []).extend(points)
    (aim_run, aim_metrics), = aim_runs(run_dir)
    assert aim_run.hash == saved["aim"]["run_hash"] and aim_run.name == "all" and aim_run.experiment == "googlenet"

    for name, got in (("mlflow", mlflow_metrics), ("wandb", wandb_metrics), ("aim", aim_metrics)):
        assert set(got) == set(board), name
        for tag, points in board.items():
            steps = sorted(s for s, _ in got[tag])
            assert steps == sorted(set(steps)) == [s for s, _ in points], (name, tag)  # each step once
            for step, value in got[tag]:
                if tag in THROUGHPUT and step == 6:
                    continue  # TensorBoard shows the resume's redone step 6, the others the first job's
                assert value == pytest.approx(dict(points)[step], rel=1e-4, abs=1e-6), (name, tag, step)
    for tag in THROUGHPUT:  # step 6 was not sent again: the first job's values, in every tracker
        first_job = dict(mlflow_metrics[tag])[6]
        assert dict(wandb_metrics[tag])[6] == pytest.approx(first_job) == dict(aim_metrics[tag])[6], tag

    config = flat(yaml.safe_load((run_dir / "config.yaml").read_text()))  # parameters: the first job's config
    wandb_config = {k: v for k, v in wandb_files[0]["config"].items() if not k.startswith("_")}  # _wandb: its own
    assert set(mlflow_run.data.params) == set(wandb_config) == set(aim_run["hparams"]) == set(config)
    assert mlflow_run.data.params["optim.lr"] == "0.01" and mlflow_run.data.params["train.max_steps"] == "6"
    assert wandb_config["model.name"] == aim_run["hparams"]["model.name"] == "googlenet"
    assert aim_run["hparams"]["train.log_with"] == ["tensorboard", "mlflow", "wandb", "aim"]

    leaked = [str(p) for p in run_dir.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
    assert not leaked, leaked


@pytest.mark.slow
def test_a_tracker_unreachable_at_the_start_is_one_warning(tiny_data, tmp_path):
    port = free_port()  # nothing listens there
    env = tracker_env(tmp_path, MLFLOW_TRACKING_URI=f"http://alice:{PASSWORD}@127.0.0.1:{port}")
    result = train(1, *TINY, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=down",
                   "train.log_with=[tensorboard,mlflow]", "train.max_steps=4", cwd=tmp_path, env=env)
    lines = warnings(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("warning: mlflow: cannot start (") and "refused" in lines[0], lines
    assert f"127.0.0.1:{port}" in lines[0] and PASSWORD not in result.stderr
    board = scalars(tmp_path / "down")
    assert [s for s, _ in board["train/loss"]] == [2, 4] and [s for s, _ in board["val/top1_error"]] == [4]
    leaked = [str(p) for p in (tmp_path / "down").rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert not leaked, leaked


LOST_MID_RUN = """
import json, sys, time
from accelerate import PartialState
from mlflow.tracking import MlflowClient
from pipeline.config import load_config
from pipeline.train.trackers import open_trackers

PartialState()
config = load_config(None, sys.argv[1:])
config.run_dir.mkdir(parents=True)
trackers = open_trackers(PartialState(), config, None)
trackers.log({"train/loss": 1.5}, step=2)
client, run_id = MlflowClient(), None
while run_id is None or not client.get_metric_history(run_id, "train/loss"):  # until step 2 is on the server
    run_id = json.loads((config.run_dir / "trackers.json").read_text()).get("mlflow", {}).get("run_id") \\
        if (config.run_dir / "trackers.json").is_file() else None
    time.sleep(0.1)
print("sent", flush=True)
sys.stdin.readline()  # the server is stopped now
for step in (4, 6, 8):
    trackers.log({"train/loss": 1.0 / step}, step=step)
trackers.finish()
print(json.dumps({"alive": trackers.alive(), "state": json.loads((config.run_dir / "trackers.json").read_text())}))
"""


@pytest.mark.slow
def test_a_tracker_lost_mid_run_is_one_warning_and_off_for_the_rest(tmp_path):
    """A real MLflow server, stopped after the first values reached it: the next send fails, once."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path / 'server.db'}", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], cwd=tmp_path, env=tracker_env(tmp_path),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        uri = f"http://bob:{PASSWORD}@127.0.0.1:{port}"
        env = tracker_env(tmp_path, MLFLOW_TRACKING_URI=uri)  # the client's retries: the project's bounds
        wait_for_server(port)
        client = subprocess.Popen([sys.executable, "-c", LOST_MID_RUN, f"output_dir={tmp_path}", "name=lost",
                                   "train.log_with=[mlflow]"], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "sent", client.communicate()[1][-3000:]
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        out, err = client.communicate("go\n", timeout=300)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert client.returncode == 0, err[-3000:]
    lines = warnings(err)
    assert len(lines) == 1 and lines[0].startswith("warning: mlflow: logging at step 4 failed ("), lines
    assert "; off for the rest of the run (a resume, or python -m pipeline.train.trackers sync " in lines[0]
    assert PASSWORD not in err
    result = json.loads(out.strip().splitlines()[-1])
    # Step 4 was recorded before its send failed; nothing was tried after it. The server had
    # step 2: sync (or a resume) starts above it, and the run it could not end ends FINISHED.
    assert result["alive"] == [] and result["state"]["sent_through"] == {"train/loss": 4}
    assert result["state"]["mlflow"]["behind"] == {"train/loss": 2} and result["state"]["mlflow"]["end_as"] == "FINISHED"
    assert PASSWORD not in (tmp_path / "lost" / "trackers.json").read_text()
    from mlflow.tracking import MlflowClient

    stored = MlflowClient(f"sqlite:///{tmp_path / 'server.db'}")  # what the server had kept
    history = stored.get_metric_history(result["state"]["mlflow"]["run_id"], "train/loss")
    assert [(m.step, m.value) for m in history] == [(2, 1.5)]
    assert stored.get_run(result["state"]["mlflow"]["run_id"]).data.params["name"] == "lost"


def wait_for_server(port: int, path: str = "/health") -> None:
    import urllib.request

    while True:  # the test's own timeout bounds this
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5):
                return
        except OSError:
            time.sleep(0.2)


HIDE_WANDB = "import sys\nsys.modules['wandb'] = None  # as if it were not installed\n"


@pytest.mark.slow
def test_a_tracker_not_installed_is_one_error_naming_its_extra(tiny_data, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(HIDE_WANDB)
    env = tracker_env(tmp_path)
    env["PYTHONPATH"] = f"{shim}{os.pathsep}{env['PYTHONPATH']}"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, f"data.dir={tiny_data}",
                             f"output_dir={tmp_path}", "name=missing", "train.log_with=[tensorboard,wandb]"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [("error: train.log_with: wandb needs the Python package wandb, which is not installed: "
                       "pip install '.[wandb]' (or bash scripts/setup.sh --trackers)")], result.stderr[-3000:]
    assert not (tmp_path / "missing").exists()  # nothing started

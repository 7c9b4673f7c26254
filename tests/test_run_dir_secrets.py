"""Nothing secret and nothing that unpickles as code in a run directory: a ``data.dir`` with
``user:password@`` is recorded without it (config.yaml, TensorBoard, the trackers), and a
checkpoint's scheduler and EMA states are plain data (JSON, safetensors): a resume refuses a
state file that would need pickle to run code, naming it, and runs none of it."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, subprocess_env
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import train_command, train_together

from pipeline.config import load_config
from pipeline.train.run import recorded_config
from pipeline.train.saved_runs import ema_state

pytestmark = pytest.mark.slow

PASSWORD = "token-4c9e7f"  # in data.dir's URL; it must not reach any file of the run directory


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def files_holding(directory: Path, secret: bytes) -> list[Path]:
    return [p for p in sorted(directory.rglob("*")) if p.is_file() and secret in p.read_bytes()]


def test_credentials_in_data_dir_are_written_nowhere_in_the_run_directory(tiny_data, http_server_factory, tmp_path):
    server = http_server_factory(tiny_data)
    shown = server.url  # http://127.0.0.1:PORT
    url = shown.replace("http://", f"http://alice:{PASSWORD}@")
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("MLFLOW_")}  # MLflow's store: the run's
    result = subprocess.run(train_command(url, tmp_path, "secret", "train.max_steps=2",
                                          "train.log_with=[tensorboard,mlflow]"),
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = tmp_path / "secret"
    assert files_holding(run_dir, PASSWORD.encode()) == []
    assert f"config.yaml records data.dir as {shown} without its credentials" in result.stderr
    assert load_config(run_dir / "config.yaml").data.dir == shown
    assert PASSWORD not in result.stdout + result.stderr  # nor in any line a log collector keeps
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"dir: {shown}" in config_text and PASSWORD not in config_text
    assert shown.removeprefix("http://").encode() in (run_dir / "mlflow" / "mlflow.db").read_bytes()  # the param
    # Evaluation reads the data with the credentials given again (the documented way).
    evaluated = subprocess.run([sys.executable, "-m", "pipeline.inference.evaluate", "--run", str(run_dir),
                                "--data", url], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    assert list(run_dir.glob("eval-*.json"))
    assert PASSWORD not in evaluated.stdout + evaluated.stderr
    assert files_holding(run_dir, PASSWORD.encode()) == []
    assert files_holding(run_dir, b"alice") == []


def test_the_recorded_data_dir_has_no_user_information_nor_query():
    config = load_config(ROOT / "configs/default.yaml", ["data.dir=https://alice:pw@example.org/ds?sig=abc"])
    recorded, note = recorded_config(config)
    assert recorded.data.dir == "https://example.org/ds" and "https://example.org/ds without its credentials" in note
    assert config.data.dir == "https://alice:pw@example.org/ds?sig=abc"  # the data is still read with them
    config = load_config(ROOT / "configs/default.yaml", ["data.dir=https://example.org/ds"])
    assert recorded_config(config) == (config, None)


# ------------------------------------------------------------------------------------------ pickles
class RunsACommand:
    """Unpickled with weights_only=False, it runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def as_legacy(checkpoint: Path, ema_object=None) -> None:
    """The checkpoint as versions before this one wrote it: the scheduler's and the EMA's states
    as Accelerate's custom_checkpoint_0.pkl and _1.pkl (torch.save); ``ema_object`` instead of
    the EMA's state."""
    if (checkpoint / "scheduler.json").is_file():
        torch.save(json.loads((checkpoint / "scheduler.json").read_text()), checkpoint / "custom_checkpoint_0.pkl")
        torch.save(load_file(checkpoint / "ema.safetensors"), checkpoint / "custom_checkpoint_1.pkl")
        (checkpoint / "scheduler.json").unlink()
        (checkpoint / "ema.safetensors").unlink()
    if ema_object is not None:
        torch.save(ema_object, checkpoint / "custom_checkpoint_1.pkl")


@pytest.fixture(scope="module")
def ema_run(tiny_data, tmp_path_factory) -> Path:
    """A one-process run with an EMA, stopped at step 2 (its checkpoint)."""
    out = tmp_path_factory.mktemp("plain-states")
    return train_together(tiny_data, out, {"first": ["ema.enabled=true", "train.max_steps=2"]})["first"]


def test_scheduler_and_ema_states_are_plain_data(ema_run):
    checkpoint = ema_run / "checkpoints" / "step-00000002"
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    assert json.loads((checkpoint / "scheduler.json").read_text())["last_epoch"] == 2
    assert int(load_file(checkpoint / "ema.safetensors")["n_averaged"]) == 2
    weights = ema_state(checkpoint, ema_run, load_config(ema_run / "config.yaml"))  # what evaluation reads
    assert "conv1.conv.weight" in weights and "n_averaged" not in weights


def test_resume_loads_plain_states_and_refuses_a_pickled_object(tiny_data, ema_run, tmp_path):
    """The same checkpoint resumed as written, in the earlier versions' format (plain pickles:
    loaded), and with an object in the EMA's file (refused with one line, nothing run)."""
    marker = tmp_path / "ran"
    for name in ("again", "legacy", "hostile"):
        shutil.copytree(ema_run, tmp_path / name)
    as_legacy(tmp_path / "legacy" / "checkpoints" / "step-00000002")
    hostile = tmp_path / "hostile" / "checkpoints" / "step-00000002"
    as_legacy(hostile, ema_object=RunsACommand(marker))
    resumed = ["ema.enabled=true", "train.max_steps=4"]
    train_together(tiny_data, tmp_path, {"again": resumed, "legacy": resumed})
    for name in ("again", "legacy"):
        assert "resumed from" in (tmp_path / f"{name}.stderr").read_text()
    for file in ("model.safetensors", "ema.safetensors"):
        ours, reference = (load_file(tmp_path / name / "checkpoints" / "step-00000004" / file)
                           for name in ("legacy", "again"))
        for key in reference:
            assert torch.equal(ours[key], reference[key]), (file, key)
    result = subprocess.run(train_command(tiny_data, tmp_path, "hostile", *resumed), cwd=tmp_path,
                            env=subprocess_env(), capture_output=True, text=True, timeout=600)
    lines = error_lines(result.stderr)
    print(lines)
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-4000:]
    assert str(hostile / "custom_checkpoint_1.pkl") in lines[0] and "posix.system" in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "hostile" / "checkpoints" / "step-00000004").exists()

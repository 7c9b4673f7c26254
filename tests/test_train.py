"""The trainer, run for real: ``accelerate launch`` with 2 gloo processes on CPU, two "nodes" on
one host, kill -9 and resume, TensorBoard read back with tensorboard's own reader."""
from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, subprocess_env
from pipeline.config import ConfigError, load_config
from pipeline.metrics import Tally, topk_correct

# A small, fast recipe on the tiny dataset (4 classes, 96 training images).
TINY = ["model.name=googlenet", "data.image_size=32", "data.batch_size=4", "data.workers=1",
        "data.shuffle_buffer=8", "schedule.name=cosine", "schedule.warmup_epochs=0.5", "optim.lr=0.01",
        "train.log_every_steps=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int, *args: str, machines: int = 1, machine_rank: int = 0, port: int | None = None) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1:
        command += ["--multi_gpu"]
    if machines > 1:
        command += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    command += ["--main_process_port", str(port or free_port()), str(ROOT / "train.py"), "--config", str(ROOT / "configs/default.yaml")]
    return command + list(args)


def launch(processes: int, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(launch_command(processes, *args), cwd=cwd, env=subprocess_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and all its descendants (torch's launcher puts ranks in new sessions)."""
    parent = psutil.Process(proc.pid)
    for p in [parent, *parent.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(newest / "model.safetensors")


def test_topk_error_on_known_logits():
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],   # label 0: top-1
                           [0.1, 0.9, 0.5, 0.4, 0.3, 0.2, 0.0],   # label 6: outside the top-5
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.6, 0.0]])  # label 3: 5th -> top-5 only
    labels = torch.tensor([0, 6, 3])
    assert topk_correct(logits, labels).tolist() == [1, 2]
    tally = Tally()
    tally.add(logits, labels, torch.tensor(3.0))
    tally.add(logits[:1], labels[:1], torch.tensor(1.0))
    errors = tally.errors()
    assert errors["top1_error"] == pytest.approx(0.5) and errors["top5_error"] == pytest.approx(0.25)
    assert errors["loss"] == pytest.approx(1.0) and tally.count == 4


def test_config_overrides_and_errors(tiny_data, tmp_path):
    config = load_config(ROOT / "configs/default.yaml", ["optim.lr=0.02", "data.batch_size=64", "data.augment.brightness=null"])
    assert (config.optim.lr, config.data.batch_size, config.data.augment.brightness) == (0.02, 64, None)
    for overrides, message in [
        (["optim.lrr=1"], "unknown key 'optim.lrr'"),
        (["optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
        (["data.batch_size=0"], "data.batch_size: 0 is out of range"),
        (["data.augment.crop_area=[0.5, 0.1]"], "data.augment.crop_area"),
        (["schedule.name=linear"], "schedule.name: 'linear' is out of range"),
        (["train.mixed_precision=fp8"], "train.mixed_precision"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
            load_config(ROOT / "configs/default.yaml", overrides)
    (tmp_path / "bad.yaml").write_text("model:\n  name: googlenet\n  auxx: true\n")
    with pytest.raises(ConfigError, match="unknown key 'model.auxx'"):
        load_config(tmp_path / "bad.yaml")
    # through the real command line: one line naming the path, exit code 2, nothing started
    missing = tmp_path / "no-such-shards"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), f"data.dir={missing}", f"output_dir={tmp_path}"],
                            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"error: data.dir: {missing}/manifest.json: no manifest" in result.stderr
    assert not (tmp_path / "demo").exists()


def test_scientific_notation_and_cpu_only_settings():
    assert load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5e-5"]).optim.lr == 0.001
    from pipeline.launch import make_accelerator

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
            make_accelerator(load_config(None, ["train.mixed_precision=fp16"]))


def test_resume_with_another_batch_layout_is_refused(tiny_data, tmp_path):
    common = [sys.executable, str(ROOT / "train.py"), *TINY, f"data.dir={tiny_data}", f"output_dir={tmp_path}",
              "name=layout", "train.max_steps=2"]
    first = subprocess.run(common, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(common + ["data.batch_size=2"], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert "step-00000002 was written with another batch layout or schedule (batch_size: 4 -> 2" in second.stderr
    assert load_config(tmp_path / "layout" / "config.yaml").data.batch_size == 4  # the original stays


def test_every_recipe_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_two_processes_train_together_and_log_to_tensorboard(tiny_data, tmp_path):
    result = launch(2, *TINY, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=ddp",
                    "schedule.epochs=2", "ema.enabled=true", cwd=tmp_path)
    run_dir = tmp_path / "ddp"
    assert "2 processes on cpu" in result.stderr
    assert "parameters identical on all 2 processes" in result.stderr
    assert "Traceback" not in result.stderr
    assert "validation top-1/top-5 error" in result.stderr.split("done in ")[1]
    records = metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    updates_per_epoch = 96 // (4 * 2)
    assert [r["step"] for r in records] == [updates_per_epoch, 2 * updates_per_epoch]
    for r in records:
        assert r["val_samples"] == 16  # uneven shards (5, 5, 5, 1) over 2 processes x 1 worker
        assert 0 <= r["val_top5_error"] <= r["val_top1_error"] <= 1 and "ema_val_top1_error" in r
    tags = scalars(run_dir)
    for tag in ["train/loss", "train/loss_aux1", "train/loss_aux2", "train/top1_error", "train/top5_error",
                "val/top1_error", "val/top5_error", "val_ema/top1_error", "val_ema/top5_error", "lr",
                "throughput/images_per_sec", "throughput/data_wait_fraction"]:
        assert tag in tags, tag
    assert [s for s, _ in tags["val/top1_error"]] == [12, 24]
    assert tags["val/top1_error"][-1][1] == pytest.approx(records[-1]["val_top1_error"])
    lrs = [v for _, v in tags["lr"]]
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs)  # warm-up, then cosine decay
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert len(events.Images("train/augmented_images")) == 2  # one grid per epoch
    assert "config/text_summary" in events.Tags()["tensors"]
    assert (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "checkpoints" / "best.json").read_text())["step"] in (12, 24)


def test_two_machines_on_one_host_form_one_group(tiny_data, tmp_path):
    port = free_port()
    args = [*TINY, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=nodes", "train.max_steps=3"]
    procs = [
        subprocess.Popen(launch_command(2, *args, machines=2, machine_rank=rank, port=port), cwd=tmp_path,
                         env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 processes on cpu" in outputs[0] and "parameters identical on all 2 processes" in outputs[0]
    assert metrics(tmp_path / "nodes")[-1]["step"] == 3


def test_killed_mid_epoch_resumes_to_the_same_parameters(tiny_data, tmp_path):
    args = [*TINY, f"data.dir={tiny_data}", "schedule.epochs=3", "data.workers=2", "ema.enabled=true",
            "train.checkpoint_every_steps=5", "train.log_every_steps=1"]
    launch(2, *args, f"output_dir={tmp_path}", "name=straight", cwd=tmp_path)

    command = launch_command(2, *args, f"output_dir={tmp_path}", "name=killed")
    proc = subprocess.Popen(command, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints / "step-00000015").is_dir():
        time.sleep(0.05)
    kill_tree(proc)  # no warning: the launcher and both ranks die at once, as on a node failure
    proc.wait()
    assert (checkpoints / "step-00000015").is_dir() and not (checkpoints / "step-00000036").exists()

    result = launch(2, *args, f"output_dir={tmp_path}", "name=killed", cwd=tmp_path)
    assert "resumed from" in result.stderr
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)
    # TensorBoard shows each step once, as the uninterrupted run does
    a, b = scalars(tmp_path / "straight"), scalars(tmp_path / "killed")
    assert [s for s, _ in b["train/loss"]] == [s for s, _ in a["train/loss"]] == list(range(1, 37))
    assert [r["step"] for r in metrics(tmp_path / "killed")] == [12, 24, 36]
    assert metrics(tmp_path / "killed")[-1]["val_top1_error"] == pytest.approx(metrics(tmp_path / "straight")[-1]["val_top1_error"])

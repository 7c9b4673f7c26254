"""Tiny trained runs (the real trainer, one process, a few steps on ``tiny_data``) for the tests
of evaluation, prediction and export."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import torch
import torchvision
from conftest import ROOT, subprocess_env

TINY = ["data.image_size=32", "data.batch_size=8", "data.workers=1", "data.shuffle_buffer=8", "schedule.name=cosine",
        "optim.lr=0.02", "train.log_every_steps=4", "train.image_grid=false"]


def train_command(data: Path, output_dir: Path, name: str, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *TINY, f"data.dir={data}", f"output_dir={output_dir}",
            f"name={name}", *overrides]


def train_process(data: Path, output_dir: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(data, output_dir, name, *overrides), cwd=output_dir, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


def train_together(data: Path, output_dir: Path, runs: dict[str, list[str]]) -> dict[str, Path]:
    """Several tiny runs at once (name -> overrides), each its own trainer process: they spend
    most of their time starting up, so together they take little longer than one."""
    processes = {}
    try:
        for name, overrides in runs.items():
            log = open(output_dir / f"{name}.stderr", "w+")  # a file, not a pipe: no child waits on a full pipe
            processes[name] = (subprocess.Popen(train_command(data, output_dir, name, *overrides), cwd=output_dir,
                                                env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=log), log)
        for name, (process, log) in processes.items():
            returncode = process.wait(timeout=300)
            log.seek(0)
            assert returncode == 0, f"{name}: exit {returncode}\n{log.read()[-4000:]}"
    finally:  # after a failure, no run is left training into the next test
        for process, log in processes.values():
            process.kill()
            process.wait()
            log.close()
    return {name: output_dir / name for name in runs}


def train(data: Path, output_dir: Path, name: str, *overrides: str) -> Path:
    result = train_process(data, output_dir, name, *overrides)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir / name


def torchvision_weights(path: Path, num_classes: int, aux_logits: bool = True) -> Path:
    """A torchvision GoogLeNet state dict on disk, as torchvision's published file is (which has
    the auxiliary heads)."""
    torch.manual_seed(1)
    model = torchvision.models.googlenet(weights=None, aux_logits=aux_logits, init_weights=True,
                                         num_classes=num_classes)
    torch.save(model.state_dict(), path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(module: str, *args: str, cwd: Path, processes: int = 1,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m MODULE``, or ``accelerate launch -m MODULE`` with gloo processes on CPU."""
    if processes == 1:
        command = [sys.executable, "-m", module]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), "-m", module]
    return subprocess.run(command + list(args), cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)

"""The ``googlenet`` command: every tool as a subcommand that is the tool's own command line (same
help, same exit code), ``googlenet train`` as ``accelerate launch train.py``, and the ``python -m``
paths unchanged."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_env

GOOGLENET = Path(sys.executable).parent / "googlenet"  # the console script pyproject.toml declares
# Each subcommand and the command line it stands for
TOOLS = {
    "data": ["-m", "data_prep"],
    "train": [str(ROOT / "train.py")],
    "evaluate": ["-m", "pipeline.inference.evaluate"],
    "predict": ["-m", "pipeline.inference.predict"],
    "export": ["-m", "pipeline.inference.export"],
    "report": ["-m", "pipeline.train.report"],
    "slurm": ["-m", "pipeline.ops.slurm"],
    "k8s": ["-m", "pipeline.ops.k8s"],
    "gpu-report": ["-m", "benchmarks.gpu_report"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def googlenet(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    assert GOOGLENET.is_file(), f"{GOOGLENET} is not installed: pip install -e ."
    return subprocess.run([str(GOOGLENET), *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_every_command_with_a_line_and_imports_no_torch():
    result = googlenet("--help")
    assert result.returncode == 0, result.stderr
    described = {}
    for line in result.stdout.splitlines():
        words = line.split(maxsplit=1)
        if line.startswith("  ") and len(words) == 2:
            described[words[0]] = words[1]
    assert set(TOOLS) <= set(described), result.stdout
    check = ("import sys; from pipeline.commands import main; main(['--help']); "
             "print(sorted({'torch', 'accelerate'} & set(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip().splitlines()[-1] == "[]"


def test_an_unknown_command_is_one_line_naming_the_commands():
    result = googlenet("evaluat")
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "evaluat" in result.stderr and all(name in result.stderr for name in TOOLS)


@pytest.mark.slow
def test_each_commands_help_is_its_tools_own_help():
    commands = [[str(GOOGLENET), name, "--help"] for name in TOOLS]
    commands += [[sys.executable, *tool, "--help"] for tool in TOOLS.values()]
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        results = list(pool.map(lambda c: subprocess.run(c, cwd=ROOT, env=subprocess_env(), capture_output=True,
                                                         text=True, timeout=300), commands))
    ours, theirs = results[:len(TOOLS)], results[len(TOOLS):]
    for name, short, tool in zip(TOOLS, ours, theirs):
        assert tool.returncode == 0 and "usage:" in tool.stdout, f"{TOOLS[name]}: {tool.stderr[-2000:]}"
        assert (short.returncode, short.stdout) == (0, tool.stdout), f"googlenet {name} --help: {short.stderr[-2000:]}"


def test_data_verify_runs_through_the_short_form(tiny_data, tmp_path):
    verified = googlenet("data", "verify", str(tiny_data), "--workers", "1", cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert f"samples OK in {tiny_data}" in verified.stdout


def test_a_tools_error_line_and_exit_code_come_through(tmp_path):
    failed = googlenet("slurm", "submit", "--config", str(tmp_path / "absent.yaml"), "--dry-run", cwd=tmp_path)
    assert (failed.returncode, failed.stdout) == (2, "")
    assert failed.stderr == f"error: {tmp_path / 'absent.yaml'}: config file not found\n"


def test_the_report_runs_through_the_short_form(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10, "epoch": 1, "val_top1_error": 0.2,
                                                        "val_top5_error": 0.05, "train_seconds": 30.0}) + "\n")
    report = googlenet("report", str(tmp_path), "--targets", "80", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "to 80%" in report.stdout and "30.0s" in report.stdout  # the time to the target, from the records


def test_gpu_report_outside_a_checkout_is_one_line(tmp_path):
    """Installed without the checkout (the benchmarks are not a package): the command copied alone
    into a fresh site, run by an interpreter that sees neither the checkout nor the installed project."""
    site = tmp_path / "site" / "pipeline"
    site.mkdir(parents=True)
    shutil.copy(ROOT / "pipeline" / "__init__.py", site)
    shutil.copy(ROOT / "pipeline" / "commands.py", site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = "import sys; from pipeline.commands import main; sys.exit(main(['gpu-report', '--help']))"
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=elsewhere, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "benchmarks/gpu_report.py" in result.stderr and "checkout" in result.stderr


def test_launch_options_and_the_trainers_arguments_are_told_apart():
    from pipeline.commands import split_train_args

    assert split_train_args(["--num_processes", "2", "--config", "configs/x.yaml", "a.b=1"]) == (
        ["--num_processes", "2"], ["--config", "configs/x.yaml", "a.b=1"])
    # a launch option's value may hold '=' and sit anywhere; --config is the trainer's, not --config_file
    assert split_train_args(["a.b=1", "--env", "A=B", "--mixed_precision=bf16", "--cpu", "--config=c.yaml",
                             "--config_file", "f.yaml", "c=2"]) == (
        ["--env", "A=B", "--mixed_precision=bf16", "--cpu", "--config_file", "f.yaml"],
        ["a.b=1", "--config=c.yaml", "c=2"])
    assert split_train_args(["--num_processes", "2", "--", "--help", "x=1"]) == (
        ["--num_processes", "2"], ["--help", "x=1"])
    with pytest.raises(ValueError, match="--no_such_option is neither"):
        split_train_args(["--no_such_option", "1"])
    assert split_train_args(["--help"]) == ([], ["--help"])
    assert split_train_args([]) == ([], [])


@pytest.mark.slow
def test_train_is_accelerate_launch_with_the_same_arguments(tiny_data, tmp_path):
    result = googlenet("train", "--num_processes", "2", "--multi_gpu", "--num_machines", "1", "--mixed_precision",
                       "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                       "--config", str(ROOT / "configs/default.yaml"), "model.name=googlenet", "data.image_size=32",
                       "data.batch_size=4", "data.workers=1", "data.shuffle_buffer=8", f"data.dir={tiny_data}",
                       f"output_dir={tmp_path}", "name=short", "train.max_steps=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 processes on cpu" in result.stderr  # the launch options reached accelerate
    records = [json.loads(line) for line in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 1  # and the overrides the trainer
    bad = googlenet("train", "--num_processes", "1", "no.such_key=1", cwd=tmp_path)
    assert bad.returncode != 0 and "no.such_key" in bad.stderr

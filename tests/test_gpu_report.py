"""The GPU report (benchmarks/gpu_report.py) in its smoke mode: every step runs at tiny sizes on
the CPU, and report.md lists each with its status and key figures, every target with its
verdict, and the time-to-accuracy plot. A step past its cap is killed and recorded, a failing
one is recorded with its stderr, and the report goes on."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, subprocess_env

from benchmarks.gpu_report import STEPS
from imaging import jpeg_region

pytestmark = pytest.mark.slow  # each test runs the report's steps as processes


def gpu_report(out: Path, *args: str) -> tuple[str, dict[str, list[str]], dict[str, list[str]]]:
    """(stdout, {step: [status, key figures, seconds]}, {target: [measured, verdict]}) of a smoke run."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_report", "--smoke", "--out", str(out), *args],
                            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=7200)
    return read_report(result, out)


def read_report(result: subprocess.CompletedProcess, out: Path):
    """What :func:`gpu_report` returns, from a finished run and its folder."""
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")]
            for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    steps = {row[0]: row[1:] for row in rows if row[0] in STEPS}
    targets = {row[0]: row[1:] for row in rows
               if row[0].startswith(("`", "the paper", "end to end", "no dip", "CIFAR", "DALI"))}
    return result.stdout, steps, targets


def test_smoke_run_reports_every_step_target_and_plot(gpu_report_smoke):
    stdout, steps, targets = read_report(*gpu_report_smoke)
    out = gpu_report_smoke[1]
    assert list(steps) == list(STEPS)
    expected_ok = set(STEPS) - (set() if jpeg_region.available() else {"loader_restart"})  # needs the C library
    for step in expected_ok:
        assert steps[step][0] == "ok", f"{step}: {steps[step]}\n{(out / 'report.md').read_text()}"
    for figure, step in (("CIFAR-10 from synthetic", "data"), ("googlenet_bn", "bench_train"),
                         ("end to end", "bench_train"), ("top-1", "cifar10"), ("img/s", "seed_recipe"),
                         ("WebDataset shards", "loader"), ("hw decoder load 1, whole image", "dali_loader"),
                         ("of device", "dali_end_to_end"), ("epoch starts", "dali_end_to_end"),
                         ("skipped" if "CPU" in stdout else "passed", "cuda_tests")):
        if step in expected_ok:
            assert figure in steps[step][1], f"{step}: {steps[step]}"
    assert (out / "cifar10.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![time to accuracy](cifar10.png)" in (out / "report.md").read_text()
    # Every target measured in the smoke run (the figures of a CPU, so mostly not met), the DALI
    # loader's and its end-to-end run's too (on DALI's CPU operators).
    assert len(targets) == 13 and sum(name.startswith("DALI") for name in targets) == 7
    assert all(verdict in ("met", "not met") for _, verdict in targets.values()), targets
    assert "| step | status | key figures | seconds |" in stdout and "| target (one H100) |" in stdout


def test_a_step_past_its_cap_is_killed_a_failing_one_recorded_and_one_over_the_budget_left_out(tmp_path):
    """A budget of 100 s: data (at most 30 s), cuda_tests (1 s) and seed_recipe (30 s) always fit in it,
    the loader's 200 s cap never does."""
    stdout, steps, targets = gpu_report(tmp_path, "--steps", "seed_recipe", "cuda_tests", "loader", "--cifar",
                                        str(tmp_path / "missing"), "--budget", "100",
                                        "--cap", "cuda_tests=1", "data=30", "seed_recipe=30", "loader=200")
    assert steps["loader"][0].startswith("not run: its cap (200 s) is over what is left of the budget")
    assert f"--out {tmp_path} --steps loader`" in stdout
    assert steps["cuda_tests"][0] == "timed out at 1 s"
    assert steps["data"][0] == "failed (exit 1)"  # the missing --cifar
    assert "missing: neither prepared shards" in (tmp_path / "report.md").read_text()
    assert steps["seed_recipe"][0].startswith("skipped")
    assert all(steps[s][0] == "not run" for s in ("bench_train", "cifar10", "loader_restart", "dali_loader",
                                                  "dali_end_to_end"))
    assert all(verdict == "-" for _, verdict in targets.values())

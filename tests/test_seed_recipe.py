"""The seeds' recipe (benchmarks/seed_recipe.py) in its smoke mode: it trains, evaluates every
test image and writes records that the time-to-accuracy report reads."""
from __future__ import annotations

import json

import pytest
from imagefiles import class_folders
from tiny_runs import run_module

from pipeline.train.report import summarize

pytestmark = pytest.mark.slow  # each test runs the seeds' training loop


def test_smoke_run_writes_metrics_the_report_reads(tmp_path):
    class_folders(tmp_path / "train", {"cat": 5, "dog": 4, "emu": 4}, seed=1)
    class_folders(tmp_path / "test", {"cat": 2, "dog": 3, "emu": 2}, seed=2)
    out = tmp_path / "seed"
    result = run_module("benchmarks.seed_recipe", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "test"),
                        "--out", str(out), "--smoke", "--batch-size", "4", "--workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["epoch"] == 1 and record["step"] == 3  # --smoke: 3 steps of the 4 an epoch has
    assert record["val_samples"] == 7 and 0 <= record["val_top1_error"] <= 1
    assert 0 < record["train_seconds"] < 300
    summary = summarize(out)
    assert summary.model == "googlenet_bn" and summary.train_seconds == record["train_seconds"]
    assert summary.final.top1_error == record["val_top1_error"]


def test_different_classes_in_train_and_test_are_refused(tmp_path):
    class_folders(tmp_path / "train", {"cat": 2, "dog": 2}, seed=1)
    class_folders(tmp_path / "test", {"cat": 1, "emu": 1}, seed=2)
    result = run_module("benchmarks.seed_recipe", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "test"),
                        "--out", str(tmp_path / "seed"), "--smoke", "--workers", "0", cwd=tmp_path)
    assert result.returncode == 2 and "hold different classes" in result.stderr

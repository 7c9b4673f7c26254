"""The time-to-accuracy report on a real short CPU run of the trainer, stopped and resumed after a
pause (which must not count as training time), and on records that carry their own clock."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import run_module, train

from pipeline.train.report import main, summarize, table

EPOCHS = ["schedule.epochs=3", "model.name=googlenet_bn", "optim.lr=0.05", "ema.enabled=true"]
PAUSE_S = 3.0


@pytest.fixture(scope="module")
def resumed(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_runs")
    # 96 images in batches of 8: 12 updates an epoch. Stop after 1.5 epochs, wait, resume.
    train(tiny_data, out, "resumed", *EPOCHS, "train.max_steps=18")
    time.sleep(PAUSE_S)
    return train(tiny_data, out, "resumed", *EPOCHS)


def clocked_records(directory: Path) -> Path:
    """A run directory whose records carry train_seconds (as benchmarks/seed_recipe.py writes)."""
    directory.mkdir()
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 10, "epoch": 1, "val_top1_error": 0.2, "val_top5_error": 0.05, "train_seconds": 30.0},
        {"step": 20, "epoch": 2, "val_top1_error": 0.08, "val_top5_error": 0.01, "train_seconds": 61.0}]))
    return directory


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_table_matches_the_runs_metrics_and_the_pause_is_not_counted(resumed):
    summary = summarize(resumed)
    records = [r for r in metrics(resumed) if "val_top1_error" in r]
    # Validations of both jobs: epoch 1 and the stop at step 18 (epoch 1.5), then epochs 2 and 3
    assert [v.epoch for v in summary.validations] == [1, 1.5, 2, 3]
    assert [v.step for v in summary.validations] == [r["step"] for r in records]
    assert summary.final.top1_error == records[-1]["val_top1_error"]
    assert summary.final.top5_error == records[-1]["val_top5_error"]
    assert summary.final.epoch == 3 and summary.model == "googlenet_bn"
    seconds = [v.seconds for v in summary.validations]
    assert seconds == sorted(seconds) and 0 < seconds[-1] <= summary.train_seconds
    # Time to a target: the clock of the first validation at or above it
    best = max(1 - r["val_top1_error"] for r in records)
    first = next(v for v in summary.validations if 1 - v.top1_error >= best)
    assert summary.seconds_to(100 * best) == first.seconds
    assert summary.seconds_to(100 * best + 0.01) is None
    # The clock against calendar time, read with tensorboard's EventAccumulator: within the first
    # job they agree; across the pause the clock runs short of it by more than the pause.
    assert len(list((resumed / "tensorboard").rglob("events.out.tfevents.*"))) == 2
    first_event, validations = event_times(resumed)
    assert summary.validations[0].seconds == pytest.approx(validations[0] - first_event, abs=1e-3)
    assert summary.final.seconds < validations[-1] - first_event - PAUSE_S


def event_times(run_dir: Path) -> tuple[float, list[float]]:
    """With tensorboard's EventAccumulator: the first event's wall time, the validations'."""
    folder = next((run_dir / "tensorboard").rglob("events.out.tfevents.*")).parent
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return events.FirstEventTimestamp(), [e.wall_time for e in events.Scalars("val/top1_error")]


@pytest.mark.slow
def test_report_command_prints_the_table_and_saves_a_plot(resumed, tmp_path):
    png = tmp_path / "tta.png"
    clocked = clocked_records(tmp_path / "clocked")
    result = run_module("pipeline.train.report", str(resumed), str(clocked), "--targets", "1", "91", "100",
                        "--plot", str(png), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["run", "model", "epochs", "train", "time", "to", "1%", "to", "91%", "to", "100%",
                                "top-1", "%", "top-5", "%"]
    summary = summarize(resumed)
    row = lines[2].split()
    assert row[:3] == ["resumed", "googlenet_bn", "3"]
    assert row[-2:] == [f"{100 * (1 - summary.final.top1_error):.2f}", f"{100 * (1 - summary.final.top5_error):.2f}"]
    assert row[-3] == "-"  # 100% is not reached on this tiny task
    assert lines[3].split() == ["clocked", "?", "2", "61.0s", "30.0s", "61.0s", "-", "92.00", "99.00"]
    assert result.stdout == table([summary, summarize(clocked)], [1, 91, 100]) + "\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 400
        image.verify()

    ema = run_module("pipeline.train.report", str(resumed), "--weights", "ema", cwd=tmp_path)
    assert ema.returncode == 0, ema.stderr
    final_ema = metrics(resumed)[-1]["ema_val_top1_error"]
    assert ema.stdout.splitlines()[2].split()[-2] == f"{100 * (1 - final_ema):.2f}"


def test_a_directory_without_metrics_is_named(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.jsonl'}: not found" in capsys.readouterr().err


def test_train_seconds_in_the_records_are_the_clock(tmp_path):
    summary = summarize(clocked_records(tmp_path / "clocked"))
    assert summary.seconds_to(80) == 30.0 and summary.seconds_to(92) == 61.0 and summary.seconds_to(93) is None
    assert summary.train_seconds == 61.0

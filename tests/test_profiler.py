"""The profiler (``train.profile_steps``): tiny real runs of the trainer with torch.profiler on the
CPU write a trace Perfetto and Chrome open (Chrome trace JSON, gzipped) holding the step's named
regions, print and save a table of where the step's time goes, and leave the weights exactly as
a run without the profiler leaves them."""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import train_together

from pipeline.train.profiling import PHASES, REGION_PREFIX, WARMUP_STEPS, StepProfiler

STEPS = 7  # the warm-up, the profiled steps, and one more after them
ROW = re.compile(r"^(?P<phase>[a-z][a-z -]*?) +(?P<total>-?[\d.]+) +(?P<per_step>-?[\d.]+) +(?P<share>-?[\d.]+)%")


def final_weights(run_dir: Path) -> dict:
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(newest / "model.safetensors")


def table(stderr: str) -> dict[str, tuple[float, float, float]]:
    """The printed table's rows: phase -> (total ms, ms per step, share in %)."""
    lines = re.split(r"[\r\n]", stderr)
    start = next(i for i, line in enumerate(lines) if line.startswith("phase "))
    rows = {}
    for line in lines[start + 1:]:
        match = ROW.match(line)
        if match is None:
            break
        rows[match["phase"]] = (float(match["total"]), float(match["per_step"]), float(match["share"]))
    return rows


def trace_events(run_dir: Path) -> list[dict]:
    with gzip.open(run_dir / "profile" / "trace-rank0.json.gz", "rt") as f:
        return json.load(f)["traceEvents"]


@pytest.mark.slow  # three tiny trainer runs
def test_profiled_steps_give_a_trace_and_a_table_and_the_same_weights(tiny_data, tmp_path):
    common = ["data.batch_size=4", "train.log_every_steps=1", "ema.enabled=true", "ema.every=1"]
    runs = train_together(tiny_data, tmp_path, {
        "plain": [*common, f"train.max_steps={STEPS}"],
        "profiled": [*common, f"train.max_steps={STEPS}", "train.profile_steps=2"],
        # more steps than the run has after its warm-up
        "longer": [*common, f"train.max_steps={STEPS - 1}", "train.profile_steps=50"],
    })
    profiled_log = (tmp_path / "profiled.stderr").read_text()

    events = trace_events(runs["profiled"])
    names = {event.get("name") for event in events}
    assert {REGION_PREFIX + phase for phase in PHASES} <= names, names
    assert sum(1 for name in names if str(name).startswith("ProfilerStep#")) == 2

    rows = table(profiled_log)
    assert list(rows) == [*PHASES, "other", "step"], rows
    assert all(total >= 0 and per_step >= 0 and share >= 0 for total, per_step, share in rows.values()), rows
    step_total = rows["step"][0]
    assert step_total > 0 and rows["step"][1] == pytest.approx(step_total / 2, abs=0.1)
    parts = sum(rows[name][0] for name in [*PHASES, "other"])
    assert parts == pytest.approx(step_total, abs=0.05 * len(rows)), rows  # rounded to 0.1 ms each
    assert rows["forward"][0] > 0 and rows["backward"][0] > 0
    summary = (runs["profiled"] / "profile" / "summary-rank0.txt").read_text()
    assert table(summary) == rows

    plain, profiled = final_weights(runs["plain"]), final_weights(runs["profiled"])
    assert profiled.keys() == plain.keys()
    different = [key for key in plain if not torch.equal(profiled[key], plain[key])]
    assert different == [], different[:5]

    longer_log = (tmp_path / "longer.stderr").read_text()
    left = STEPS - 1 - WARMUP_STEPS
    assert f"train.profile_steps=50: only {left} steps left after the {WARMUP_STEPS} warm-up steps" in longer_log
    longer_steps = {e.get("name") for e in trace_events(runs["longer"]) if str(e.get("name")).startswith("ProfilerStep#")}
    assert len(longer_steps) == left


def test_a_window_cut_short_writes_no_trace(tmp_path):
    """A stop inside the profiled window (a stop signal, an error) ends the profiler and writes
    nothing: its last step is incomplete. Said in one line."""
    said = []
    profiler = StepProfiler(3, tmp_path / "profile", announce=said.append)
    model = torch.nn.Linear(8, 8)
    with pytest.raises(KeyboardInterrupt), profiler:
        for _ in range(WARMUP_STEPS + 1):
            with profiler.region("forward"):
                loss = model(torch.randn(4, 8)).sum()
            loss.backward()
            profiler.step()
        raise KeyboardInterrupt
    assert profiler.profiler is None and not (tmp_path / "profile").exists()
    assert said == ["the profile was cut short by the run's stop: no trace written"]

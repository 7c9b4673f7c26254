"""Time to accuracy: a table and a plot of validation error against training wall-clock.

    python -m pipeline.train.report runs/cifar10 runs/cifar10_paper runs/seed_recipe \\
        --targets 90 93 94 --plot time_to_accuracy.png

For each run directory: its epochs, the training clock at which validation top-1 accuracy
first reached each target, and the final top-1/top-5 accuracy (from ``metrics.jsonl``, the
trainer's record of every validation).

The clock. A run's ``metrics.jsonl`` records may carry ``train_seconds`` (benchmarks/
seed_recipe.py writes it); otherwise the clock is read from the run's TensorBoard event files
with tensorboard's own reader, as follows. Every start of the trainer (the first, and each
resume) writes a new event file; its clock runs from the file's first event (written when
tracking starts, after the model and data are set up) to its last event. The clock of a run
is the sum over its event files, so time between jobs (queued, preempted, down) is not
counted, while work that a resume had to redo (the steps after the last checkpoint) is: it
was spent. A validation logged at step S in the k-th file is at the clock of the k-1 files
before plus the time from the k-th file's start to that event; its time includes the
validation itself (the accuracy is known only then). Where a resume discarded logged steps
(TensorBoard's purge step), the validation that survives is the one of the resumed job, as in
``metrics.jsonl``. Data preparation is never part of the clock.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .tracking import METRICS_FILE, TRACKER_DIR

TAGS = {"model": ("val/top1_error", "val/top5_error"), "ema": ("val_ema/top1_error", "val_ema/top5_error")}
FIELDS = {"model": ("val_top1_error", "val_top5_error"), "ema": ("ema_val_top1_error", "ema_val_top5_error")}


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message names the file."""


@dataclass
class Validation:
    step: int
    epoch: float
    top1_error: float
    top5_error: float
    seconds: float  # training clock at which it was known


@dataclass
class RunSummary:
    directory: Path
    name: str
    model: str
    validations: list[Validation] = field(default_factory=list)
    train_seconds: float = 0.0  # the whole run's clock

    @property
    def final(self) -> Validation:
        return self.validations[-1]

    def seconds_to(self, top1_accuracy_percent: float) -> float | None:
        """The clock at the first validation with at least that top-1 accuracy (None: never)."""
        for v in self.validations:
            if 100 * (1 - v.top1_error) >= top1_accuracy_percent - 1e-9:
                return v.seconds
        return None


def read_metrics(run_dir: Path, weights: str) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"{path}: not found (is {run_dir} a run directory?)")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}:{lineno}: not JSON ({exc})") from exc
        if FIELDS[weights][0] in record:
            records.append(record)
    if not records:
        what = "EMA validation (run with ema.enabled=true)" if weights == "ema" else "validation"
        raise ReportError(f"{path}: no {what} records")
    return records


def event_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / TRACKER_DIR).rglob("events.out.tfevents.*"))


def scalar_value(value) -> float:
    if value.HasField("simple_value"):
        return value.simple_value
    from tensorboard.util import tensor_util

    return float(tensor_util.make_ndarray(value.tensor))


def segments(run_dir: Path, tag: str) -> list[tuple[float, float, int | None, dict[int, float]]]:
    """Per event file, in the order written: (first wall time, last wall time, purge step or None,
    {step: wall time of the ``tag`` event})."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found = []
    for path in event_files(run_dir):
        first = last = None
        purge, at = None, {}
        try:
            for event in EventFileLoader(str(path)).Load():
                first = event.wall_time if first is None else first
                last = event.wall_time
                if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                    purge = event.step  # a resumed writer: steps from here on replace earlier ones
                for value in event.summary.value:
                    if value.tag == tag:
                        at[event.step] = event.wall_time
        except Exception as exc:  # a truncated last record is tolerated by the loader; anything else is not
            raise ReportError(f"{path}: unreadable TensorBoard event file ({exc})") from exc
        if first is not None:
            found.append((first, last, purge, at))
    return sorted(found, key=lambda s: s[0])


def clock_from_events(run_dir: Path, tag: str) -> tuple[dict[int, float], float]:
    """({step: training clock of the validation logged at that step}, the run's whole clock)."""
    files = segments(run_dir, tag)
    if not files:
        raise ReportError(f"{run_dir / TRACKER_DIR}: no TensorBoard event files, and {METRICS_FILE} has no "
                          f"train_seconds: the run's clock is unknown")
    clock: dict[int, float] = {}
    before = 0.0
    for start, end, purge, at in files:
        if purge is not None:
            clock = {s: t for s, t in clock.items() if s < purge}
        clock.update({step: before + wall - start for step, wall in at.items()})
        before += end - start
    return clock, before


def summarize(run_dir: Path, weights: str = "model") -> RunSummary:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir, weights)
    top1, top5 = FIELDS[weights]
    model = "?"
    config = run_dir / "config.yaml"
    if config.is_file():
        import yaml

        model = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("name", "?")
    summary = RunSummary(run_dir, run_dir.name, model)
    if all("train_seconds" in r for r in records):
        seconds = {r["step"]: r["train_seconds"] for r in records}
        summary.train_seconds = max(seconds.values())
    else:
        seconds, summary.train_seconds = clock_from_events(run_dir, TAGS[weights][0])
    for r in records:
        if r["step"] not in seconds:
            raise ReportError(f"{run_dir / METRICS_FILE}: the validation at step {r['step']} is not in the "
                              f"TensorBoard events of {run_dir / TRACKER_DIR}")
        summary.validations.append(Validation(r["step"], r["epoch"], r[top1], r[top5], seconds[r["step"]]))
    return summary


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def table(runs: list[RunSummary], targets: list[float]) -> str:
    header = ["run", "model", "epochs", "train time", *(f"to {t:g}%" for t in targets), "top-1 %", "top-5 %"]
    rows = [header]
    for r in runs:
        rows.append([r.name, r.model, f"{r.final.epoch:g}", format_seconds(r.train_seconds),
                     *(format_seconds(r.seconds_to(t)) for t in targets),
                     f"{100 * (1 - r.final.top1_error):.2f}", f"{100 * (1 - r.final.top5_error):.2f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(runs: list[RunSummary], targets: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(figsize=(8, 5), dpi=120)
    for r in runs:
        axes.plot([v.seconds / 60 for v in r.validations], [100 * v.top1_error for v in r.validations],
                  marker="o", markersize=3, label=f"{r.name} ({r.model})")
    for t in targets:
        axes.axhline(100 - t, color="grey", linestyle=":", linewidth=0.8)
        axes.annotate(f"{t:g}% top-1", (0, 100 - t), textcoords="offset points", xytext=(2, 2), fontsize=7,
                      color="grey", xycoords=("axes fraction", "data"))
    axes.set_xlabel("training wall-clock (minutes)")
    axes.set_ylabel("validation top-1 error (%)")
    axes.set_yscale("log")  # the last points in a few percent matter as much as the first ones
    axes.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    axes.set_xlim(left=0)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--targets", nargs="+", type=float, default=[90.0, 93.0, 94.0],
                        help="top-1 accuracies in percent (default: 90 93 94)")
    parser.add_argument("--weights", choices=("model", "ema"), default="model",
                        help="report the trained weights' validation or their EMA's")
    parser.add_argument("--plot", type=Path, help="save a PNG of validation error against wall-clock here")
    args = parser.parse_args(argv)
    try:
        runs = [summarize(d, args.weights) for d in args.runs]
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(runs, args.targets))
    if args.plot:
        plot(runs, args.targets, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

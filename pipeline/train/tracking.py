"""TensorBoard (through Accelerate's tracker, when ``train.log_with`` names it) and ``metrics.jsonl``,
from the main process only; ``trackers`` sends the scalars on to every tracker chosen.

Everything for step S is logged before checkpoint S is written. On resume from checkpoint S,
TensorBoard's ``purge_step=S+1`` hides whatever the interrupted run logged after S, and
``metrics.jsonl`` (and ``skipped_samples.jsonl``) are cut back to S, so no step is shown twice
or lost.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml

from imaging.specs import IMAGENET_MEAN, IMAGENET_STD

from .metrics import Tally

TRACKER_DIR = "tensorboard"
METRICS_FILE = "metrics.jsonl"
SKIPPED_FILE = "skipped_samples.jsonl"  # see pipeline.train.bad_samples


def start_tracking(accelerator, run_dir: Path, resume_step: int, config_text: str) -> None:
    init_kwargs = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step else {}
    accelerator.init_trackers(TRACKER_DIR, init_kwargs=init_kwargs)
    if accelerator.is_main_process:
        for name in (METRICS_FILE, SKIPPED_FILE):
            _truncate(run_dir / name, resume_step)
        board = tensorboard(accelerator)
        if board is not None and not resume_step:
            # Markdown code block, so TensorBoard's text tab shows the YAML as written.
            text = "    " + config_text.replace("\n", "\n    ")
            board.log({"config": text}, step=0)
            board.writer.add_custom_scalars(dashboard_layout(on_gpu=accelerator.device.type == "cuda"))
            recorded = yaml.safe_load(config_text)
            if isinstance(recorded, dict):  # the run's config.yaml (some callers record none)
                for summary in hparams_summaries(recorded):
                    board.writer.file_writer.add_summary(summary)
            board.writer.flush()


# The recipe's values in TensorBoard's HParams tab (the run's name is its trial ID), with the
# config's dotted keys as the other trackers name them, beside the metrics: the last value of
# each tag. Five, as many as the tab shows before the user picks more.
HPARAMS = ("model.name", "optim.lr", "data.batch_size", "data.image_size", "schedule.epochs")
HPARAMS_METRICS = ("val/top1_error", "val/top5_error")


def hparams_summaries(config: dict) -> tuple:
    """The HParams plugin's experiment (which hparams and metrics it has) and this run's values,
    written into the run's own event file: ``SummaryWriter.add_hparams`` would make another run
    in a folder of its own, and log the metrics once, at the call."""
    from torch.utils.tensorboard.summary import hparams

    def value(key: str):
        section = config
        for part in key.split("."):
            section = section[part]
        return section

    experiment, session_start, _ = hparams({key: value(key) for key in HPARAMS}, dict.fromkeys(HPARAMS_METRICS))
    return experiment, session_start


def dashboard_layout(on_gpu: bool) -> dict:
    """TensorBoard's Custom Scalars tab: train and validation on one chart; the loader's share of
    the time, and on a GPU its memory. Each series is a regular expression over the tags."""
    def chart(*tags: str) -> list:
        return ["Multiline", [f"^{tag}$" for tag in tags]]

    layout = {
        "errors": {
            "top-1 error (train, val, val EMA)": chart("train/top1_error", "val/top1_error", "val_ema/top1_error"),
            "top-5 error (train, val, val EMA)": chart("train/top5_error", "val/top5_error", "val_ema/top5_error"),
            "loss (train, val)": chart("train/loss", "val/loss"),
        },
        "input": {
            "share of the time waiting for data": chart("throughput/data_wait_fraction"),
            "images per second": chart("throughput/images_per_sec"),
        },
    }
    if on_gpu:
        layout["memory"] = {"GPU memory, GiB": chart("memory/allocated_gib", "memory/max_reserved_gib",
                                                     "memory/peak_gpu_gib")}
    return layout


def tensorboard(accelerator):
    """Accelerate's TensorBoard tracker on the main process; None elsewhere, or when
    ``train.log_with`` leaves TensorBoard out (the Accelerator then has no tracker)."""
    if not accelerator.is_main_process:
        return None
    return next((tracker for tracker in accelerator.trackers if tracker.name == "tensorboard"), None)


def _truncate(path: Path, resume_step: int) -> None:
    """Keep the lines up to the resumed step; a line cut short by a crash or a full disk goes too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= resume_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    path.write_text("".join(line + "\n" for line in kept))


def append_metrics(accelerator, run_dir: Path, record: dict) -> None:
    append_records(accelerator, run_dir / METRICS_FILE, [record])


def append_records(accelerator, path: Path, records: list[dict]) -> None:
    """JSON lines, each with the ``step`` it belongs to (a resume cuts the file back by it)."""
    if accelerator.is_main_process:
        with open(path, "a") as f:
            f.write("".join(json.dumps(record, sort_keys=True) + "\n" for record in records))


def log_image_grid(accelerator, images: torch.Tensor, step: int, count: int = 32) -> None:
    """The first ``count`` network inputs (normalised) back in [0, 1], as one grid (TensorBoard only)."""
    board = tensorboard(accelerator)
    if board is None:
        return
    from torchvision.utils import make_grid

    batch = images[:count].detach().float().cpu()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    grid = make_grid((batch * std + mean).clamp(0, 1), nrow=8)
    board.log_images({"train/augmented_images": grid[None]}, step=step)


class LogWindow:
    """What this process did since the last log line: images, time waiting for data, the
    losses of each head, and a top-k tally (reduced over the processes when logged)."""

    def __init__(self):
        self.start, self.data_wait, self.images, self.batches = time.perf_counter(), 0.0, 0, 0
        self.loss_sums: torch.Tensor | None = None
        self.tally = Tally()

    def add(self, counts: torch.Tensor, losses: torch.Tensor, images: int) -> None:
        """One micro-batch: its ``Tally.counts``, [main, aux...] mean losses and image count."""
        self.tally.add_counts(counts)
        self.loss_sums = losses if self.loss_sums is None else self.loss_sums + losses
        self.images += images
        self.batches += 1

    def values(self, accelerator, lr: float) -> dict[str, float]:
        """The scalars of a log line; every process must call it (the tally is all-reduced)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        errors = self.tally.reduce(accelerator).errors()
        values = {
            "train/loss": errors["loss"], "train/top1_error": errors["top1_error"],
            "train/top5_error": errors["top5_error"], "lr": lr,
            "throughput/images_per_sec": self.images * accelerator.num_processes / elapsed,
            "throughput/data_wait_fraction": self.data_wait / elapsed,
        }
        if self.loss_sums is not None:
            for i, value in enumerate((self.loss_sums / self.batches).tolist()[1:], start=1):
                values[f"train/loss_aux{i}"] = value
        if accelerator.device.type == "cuda":  # the caching allocator's counters, on the host: no wait
            device = accelerator.device
            values["memory/peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            values["memory/allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
            values["memory/max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        return values

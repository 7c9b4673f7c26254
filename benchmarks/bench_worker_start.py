"""Start-up cost of the shard loader's workers: forked from the training process (before) against
started by the fork server of ``pipeline.data.batches.worker_context`` (now), on the same
shards, in one run.

    python benchmarks/bench_worker_start.py --shards demo_data/shards [--workers 4] [--repeats 3]

Each measurement is a fresh process, as a training run is, the two ways taking turns. It builds
the trainer's input with the default recipe's loader settings (224 px, batch 32, validation
batch 64, shuffle buffer 2000) and times, from the moment the input is built: the first
training batch (now: the fork server's start and its imports included), then, after the
epoch, the first batch of the first validation and of the second (before: workers forked
anew for each validation; now: the same workers), and the whole second validation. Prints the
median of each and the ratio now / before.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from torch.utils.data import DataLoader  # noqa: E402

from imaging.crops import eval_resize_for  # noqa: E402
from imaging.specs import CropSpec  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.data.batches import start_worker  # noqa: E402
from pipeline.data.prepared import open_prepared  # noqa: E402
from pipeline.data.webdataset_input import EvalStream, TrainStream, WebDatasetInput  # noqa: E402

WAYS = ("fork", "forkserver")


def forked_loader(stream, workers: int, persistent: bool) -> DataLoader:
    """``make_loader`` as it was: workers forked from this process."""
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=False, persistent_workers=persistent,
                      prefetch_factor=4, multiprocessing_context="fork",
                      worker_init_fn=functools.partial(start_worker, dict(os.environ)))


def measure(shards: Path, way: str, workers: int) -> dict[str, float]:
    """The start-up times of one process (seconds)."""
    c = Config().data
    data = open_prepared(shards)
    per_epoch = data.train_samples // c.batch_size
    train = TrainStream(data.train, batch_size=c.batch_size, batches_per_epoch=per_epoch, rank=0, world_size=1, seed=0,
                        image_size=c.image_size, crop=CropSpec(), baked=False, shuffle_buffer=c.shuffle_buffer,
                        eval_resize=eval_resize_for(c.image_size, c.eval_resize), num_classes=data.num_classes)
    val = EvalStream(data.val, batch_size=2 * c.batch_size, rank=0, world_size=1, image_size=c.image_size,
                     resize=eval_resize_for(c.image_size, c.eval_resize), num_classes=data.num_classes)
    started = time.perf_counter()
    if way == "forkserver":
        loader_input = WebDatasetInput(train, val, workers, pin_memory=False)
        train.set_epoch(0)
        train_batches, val_batches = loader_input.train_batches(0), loader_input.val_batches
    else:
        train.set_epoch(0)
        train_batches = iter(forked_loader(train, workers, persistent=True))
        val_batches = lambda: iter(forked_loader(val, workers, persistent=False))  # noqa: E731
    times = {}
    next(train_batches)
    times["first training batch"] = time.perf_counter() - started
    assert sum(1 for _ in train_batches) == per_epoch - 1
    for validation in ("first", "second"):
        started = time.perf_counter()
        batches = val_batches()
        next(batches)
        times[f"{validation} validation: first batch"] = time.perf_counter() - started
        rest = sum(len(labels) for _, labels, _ in batches)
        times[f"{validation} validation: all"] = time.perf_counter() - started
    assert rest > 0
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, default=Path("demo_data/shards"),
                        help="a directory written by 'python -m data_prep demo' or 'python -m data_prep shards'")
    parser.add_argument("--workers", type=int, default=Config().data.workers)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # one measurement, in this process
    args = parser.parse_args(argv)
    if not (args.shards / "manifest.json").is_file():
        parser.error(f"--shards: {args.shards}/manifest.json: no manifest (prepare it with 'python -m data_prep demo')")
    if args.way:
        print(json.dumps(measure(args.shards, args.way, args.workers)))
        return 0

    results: dict[str, list[dict]] = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way in WAYS:
            child = subprocess.run([sys.executable, __file__, "--shards", str(args.shards), "--workers",
                                    str(args.workers), "--way", way], capture_output=True, text=True, check=True)
            results[way].append(json.loads(child.stdout.splitlines()[-1]))
    print(f"{args.workers} workers, {args.repeats} processes each way; median seconds (the first training batch "
          f"from the input's construction, a validation from its start)")
    print(f"{'':34} {'fork (before)':>14} {'fork server (now)':>18} {'now / before':>13}")
    for name in results["fork"][0]:
        before = statistics.median(r[name] for r in results["fork"])
        now = statistics.median(r[name] for r in results["forkserver"])
        print(f"{name:34} {before:14.2f} {now:18.2f} {now / before:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

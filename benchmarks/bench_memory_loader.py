"""Training-input throughput on a small-image dataset: the in-memory loader against the shard
loader (the reference), on the same prepared shards, crop, batch size and device, in one run.

    python benchmarks/bench_memory_loader.py --shards /tmp/cifar10-shards [--size 128] [--batch-size 512]
                                             [--workers 15] [--batches 100] [--device cuda]

Both deliver uint8 [B, 3, size, size] training batches on ``--device`` with the random-resized
crop (area 25-100%) and flip of configs/cifar10.yaml: the shard loader decodes and crops in
``--workers`` loader processes and the batch is copied to the device; the in-memory loader
decodes the shards once (its loading time is printed, not counted) and crops on the device.
Prints images/s for each (best of ``--repeats`` passes of ``--batches`` batches, after one
warm-up batch) and the ratio to the shard loader.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from imaging.crops import eval_resize_for  # noqa: E402
from imaging.specs import CropSpec  # noqa: E402
from pipeline.data.memory_input import MemoryInput  # noqa: E402
from pipeline.data.prepared import open_prepared  # noqa: E402
from pipeline.data.webdataset_input import TrainStream, WebDatasetInput  # noqa: E402


def rate(batches, count: int, device: torch.device) -> float:
    """Images/s over ``count`` batches moved to ``device``, after one warm-up batch."""
    next(batches)[0].to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, images = time.perf_counter(), 0
    for _ in range(count):
        batch = next(batches)[0].to(device, non_blocking=True)
        images += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, required=True, help="a directory written by 'python -m data_prep shards'")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=15)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    data = open_prepared(args.shards)
    per_epoch = data.train_samples // args.batch_size
    if per_epoch < args.batches + 1:
        parser.error(f"{data.train_samples} training samples give {per_epoch} batches of {args.batch_size}; "
                     f"ask for fewer than {per_epoch} --batches")
    crop = CropSpec(area=(0.25, 1.0), interpolations=("bilinear",))
    eval_resize = eval_resize_for(args.size, args.size)
    common = dict(batch_size=args.batch_size, batches_per_epoch=per_epoch, rank=0, world_size=1, seed=0,
                  image_size=args.size, eval_resize=eval_resize)
    stream = TrainStream(data.train, **common, crop=crop, baked=False, shuffle_buffer=2000,
                         num_classes=data.num_classes)
    shards = WebDatasetInput(stream, None, args.workers, pin_memory=device.type == "cuda")
    started = time.perf_counter()
    memory = MemoryInput(data, **common, eval_batch_size=args.batch_size, crop=crop, device=device,
                         workers=args.workers)
    print(f"in-memory loader: {data.train_samples + data.val_samples} images decoded in "
          f"{time.perf_counter() - started:.1f}s with {args.workers} workers", file=sys.stderr)

    results = {
        "shard loader": max(rate(shards.train_batches(e), args.batches, device) for e in range(args.repeats)),
        "in-memory loader": max(rate(memory.train_batches(e), args.batches, device) for e in range(args.repeats)),
    }
    reference = results["shard loader"]
    print(f"{args.size} px, batch {args.batch_size}, {args.workers} workers, {device}:")
    for name, value in results.items():
        print(f"  {name:17s} {value:10.0f} img/s   x{value / reference:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

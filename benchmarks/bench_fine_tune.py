"""What starting from trained weights is worth, measured on CIFAR-10 split in two halves.

    tar -xzf ../shared/data/cifar10-jpg.tar.gz -C /tmp
    python -m benchmarks.bench_fine_tune --src /tmp/cifar10 --out /tmp/bench-fine-tune

No ImageNet weights can be fetched here, so the source task is CIFAR-10's first five classes
(airplane, automobile, bird, cat, deer; ``--source-per-class`` training images each) and the
target its other five (dog, frog, horse, ship, truck) with only ``--target-per-class`` images
each: a small dataset of other classes, as fine-tuning meets it. ``googlenet_bn`` at 32 px
(``configs/cifar10.yaml`` with the CPU's settings) is trained on the source, then on the target
four ways, for the same epochs: from scratch; fine-tuned from the source run (its classifier
fresh) at the scratch lr, and at a tenth of it with the head at 10x; and as a linear probe
(``model.freeze=all_but_head``).
Every run is the real trainer (``train.py``); the table reads their ``metrics.jsonl`` and prints
each target run's validation error against the from-scratch run of the same invocation.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_CLASSES = ("airplane", "automobile", "bird", "cat", "deer")
TARGET_CLASSES = ("dog", "frog", "horse", "ship", "truck")
CPU = ["data.image_size=32", "data.eval_resize=32", "model.compile=false", "train.mixed_precision=no",
       "data.batch_size=64", "data.workers=2", "ema.enabled=false", "train.image_grid=false",
       "schedule.warmup_epochs=1"]


def link_subset(src: Path, out: Path, classes: tuple[str, ...], per_class: int | None) -> Path:
    """Class folders of links to the first ``per_class`` images of each class (all with None)."""
    for split, limit in (("train", per_class), ("test", None)):
        for name in classes:
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for image in sorted((src / split / name).iterdir())[:limit]:
                link = folder / image.name
                if not link.exists():
                    link.symlink_to(image.resolve())
    return out


def run(command: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def prepare(folders: Path, shards: Path) -> Path:
    if not (shards / "manifest.json").is_file():
        run([sys.executable, "-m", "data_prep", "shards", "--train", str(folders / "train"), "--val",
             str(folders / "test"), "--out", str(shards), "--shard-size", "1000", "--raw-pixels"])
    return shards


def train(data: Path, runs: Path, name: str, epochs: int, *overrides: str) -> dict:
    seconds = run([sys.executable, "train.py", "--config", "configs/cifar10.yaml", *CPU, f"data.dir={data}",
                   f"output_dir={runs}", f"name={name}", f"schedule.epochs={epochs}", *overrides])
    records = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    return {"name": name, "epochs": epochs, "seconds": seconds, "train_samples": last["train_samples"],
            "val_top1_error": last["val_top1_error"], "best_top1_error": min(r["val_top1_error"] for r in records)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, type=Path, help="CIFAR-10 class folders (train/, test/)")
    parser.add_argument("--out", required=True, type=Path, help="working folder (data, shards, runs)")
    parser.add_argument("--source-per-class", type=int, default=5000)
    parser.add_argument("--target-per-class", type=int, default=200)
    parser.add_argument("--source-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15, help="of each target run (validated every 5)")
    args = parser.parse_args(argv)
    out, runs = args.out, args.out / "runs"
    source = prepare(link_subset(args.src, out / "source", SOURCE_CLASSES, args.source_per_class), out / "source-shards")
    target = prepare(link_subset(args.src, out / "target", TARGET_CLASSES, args.target_per_class), out / "target-shards")
    pretrained = train(source, runs, "source", args.source_epochs)
    weights = f"model.weights={runs / 'source'}"
    every = f"train.eval_every_epochs={min(5, args.epochs)}"
    rows = [
        train(target, runs, "scratch", args.epochs, every),
        train(target, runs, "fine-tuned", args.epochs, every, weights),
        train(target, runs, "fine-tuned-head-x10", args.epochs, every, weights, "optim.lr=0.01",
              "optim.head_lr_factor=10"),
        train(target, runs, "linear-probe", args.epochs, every, weights, "model.freeze=all_but_head"),
    ]
    print(f"source: {len(SOURCE_CLASSES)} classes x {args.source_per_class} images, {args.source_epochs} epochs: "
          f"val top-1 error {pretrained['val_top1_error']:.3f} ({pretrained['seconds']:.0f} s)")
    print(f"target: {len(TARGET_CLASSES)} other classes x {args.target_per_class} images, {args.epochs} epochs each")
    print("| target run | val top-1 error (last / best) | error / from scratch | seconds |")
    print("| --- | --- | --- | --- |")
    scratch = rows[0]["val_top1_error"]
    for row in rows:
        print(f"| {row['name']} | {row['val_top1_error']:.3f} / {row['best_top1_error']:.3f} | "
              f"{row['val_top1_error'] / scratch:.2f}x | {row['seconds']:.0f} |")
    return [pretrained, *rows]


if __name__ == "__main__":
    main()

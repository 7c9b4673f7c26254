"""Preparation throughput against a naive single-process PIL loop, measured in the same run.

    python benchmarks/bench_prep.py --src DIR [--replicate N] [--workers 1 2 4] [--resize-shorter 256] [--restart-markers]

DIR holds class folders, or flat image files (then treated as one class). ``--replicate N``
copies every file N times (hard links) to reach a realistic image count. The naive reference
decodes, converts to RGB, optionally resizes, re-encodes at quality 90 and writes one tar,
the way a first script would; the pipeline runs ``python -m data_prep shards`` logic with each
worker count. Ratios are against the reference measured in the same run.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_prep.plan import PrepParams  # noqa: E402
from data_prep.writer import run  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def stage(src: Path, replicate: int, dest: Path) -> list[Path]:
    """Class-folder copy of ``src`` with every file present ``replicate`` times."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    staged = []
    for path in files:
        relative = path.relative_to(src)
        cls = relative.parts[0] if len(relative.parts) > 1 else "images"
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for k in range(replicate):
            target = dest / cls / f"{path.stem}_r{k}{path.suffix}"
            os.link(path, target)
            staged.append(target)
    return staged


def naive(files: list[Path], out: Path, resize_shorter: int | None) -> float:
    start = time.perf_counter()
    with tarfile.open(out, "w") as tar:
        for i, path in enumerate(files):
            image = Image.open(path).convert("RGB")
            if resize_shorter and min(image.size) > resize_shorter:
                scale = resize_shorter / min(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=90)
            info = tarfile.TarInfo(f"{i:08d}.jpg")
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--replicate", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--resize-shorter", type=int)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--restart-markers", action="store_true", help="data_prep shards --restart-markers")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_prep_"))
    try:
        files = stage(args.src, args.replicate, work / "src")
        n = len(files)
        print(f"{n} images from {args.src} (x{args.replicate}), resize_shorter={args.resize_shorter}, cpus={os.cpu_count()}")
        reference = naive(files, work / "naive.tar", args.resize_shorter)
        print(f"{'naive PIL loop, 1 process':32s} {n / reference:9.0f} img/s   1.00x")
        params = PrepParams(train=str(work / "src"), shard_size=args.shard_size, resize_shorter=args.resize_shorter,
                            restart_markers=args.restart_markers)
        for workers in args.workers:
            out = work / f"shards_w{workers}"
            start = time.perf_counter()
            run(params, out, workers=workers)
            elapsed = time.perf_counter() - start
            label = f"data_prep shards, {workers} workers"
            print(f"{label:32s} {n / elapsed:9.0f} img/s   {reference / elapsed:.2f}x", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

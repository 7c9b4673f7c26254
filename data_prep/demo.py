"""The embedded demo: synthetic ILSVRC-layout images prepared into shards, in one call.

Used by ``python -m data_prep demo`` and by the trainer, which prepares the demo on first use.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from shards.cpus import usable_cpus
from shards.manifest import MANIFEST, PrepError

from .plan import PrepParams
from .synthetic import VERSION, SyntheticSpec, generate, written_version

DEFAULT_ROOT = Path("demo_data")
DEMO_SHARD_SIZE = 100  # small shards so ranks and loader workers each get several


def demo_params(images: Path) -> PrepParams:
    return PrepParams(
        train=str((images / "train").absolute()),
        val=str((images / "val").absolute()),
        val_labels=str((images / "val_labels.txt").absolute()),
        class_names=str((images / "LOC_synset_mapping.txt").absolute()),
        shard_size=DEMO_SHARD_SIZE,
    )


def ensure_demo(root: Path = DEFAULT_ROOT, workers: int | None = None) -> Path:
    """Generate and shard the demo data under ``root`` unless it is already there; return the
    shard directory. Both steps are idempotent, so an interrupted preparation just resumes."""
    from .writer import run

    root = Path(root)
    shards = root / "shards"
    if (shards / MANIFEST).is_file():
        refuse_earlier_version(root)
        return shards
    workers = workers or usable_cpus()
    spec = SyntheticSpec()
    count = spec.num_classes * (spec.train_per_class + spec.val_per_class)
    started = time.perf_counter()
    say(f"demo: generating {count} synthetic images ({spec.num_classes} classes, ILSVRC2012 layout) "
        f"in {root / 'images'}, once")
    generate(root / "images", spec, workers=workers)
    say(f"demo: preparing them into WebDataset shards in {shards}, once")
    run(demo_params(root / "images"), shards, workers=workers)
    say(f"demo: data ready in {time.perf_counter() - started:.0f}s; later runs reuse it")
    return shards


def refuse_earlier_version(root: Path) -> None:
    """Demo data from an earlier generator has other images: stop rather than train on it."""
    version = written_version(root / "images")
    if version is not None and version != VERSION:
        raise PrepError(f"{root} holds the demo data of an earlier version of the generator (version {version}, "
                        f"now {VERSION}); remove {root} and run again to generate the current one")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_demo_ffcv(root: Path = DEFAULT_ROOT, workers: int | None = None) -> Path:
    """The demo as FFCV files (``root/ffcv``), converted from the demo shards."""
    from .ffcv_writer import FFCVParams, run

    target = Path(root) / "ffcv"
    if (target / MANIFEST).is_file():
        refuse_earlier_version(Path(root))
        return target
    shards = ensure_demo(root, workers)
    run(target, FFCVParams(), workers or usable_cpus(), from_shards=shards)
    return target


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="generate the demo images and prepare them into shards")
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"default: {DEFAULT_ROOT}")
    p.add_argument("--workers", type=int)
    p.set_defaults(func=lambda a: print(ensure_demo(a.root, a.workers)) or 0)

"""``python -m data_prep``: synthetic | demo | shards | ffcv | finalize | verify."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shards.cpus import usable_cpus
from shards.manifest import PrepError, finalize
from shards.store import StoreError, error_line, is_remote

from . import demo, synthetic, verify
from .plan import PrepParams
from .sources import SourceError
from .transfer import RemoteOutput, default_stage, download_dataset


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_shards(subparsers) -> None:
    p = subparsers.add_parser(
        "shards",
        help="write WebDataset shards and a manifest",
        description="Read class folders, ILSVRC2012 archives, CIFAR-10/100 or STL-10 binary archives, or labelled flat files and write "
        "shuffled WebDataset tar shards plus DIR/manifest.json. Re-running resumes.",
    )
    p.add_argument("--train", required=True, help="class folders, ILSVRC2012_img_train.tar, or a CIFAR-10/100 "
                   "or STL-10 binary .tar.gz (its training part)")
    p.add_argument("--val", help="class folders, flat files, ILSVRC2012_img_val.tar, or the same binary .tar.gz "
                   "(its test part) (the trainer needs it)")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--val-labels", help="LOC_val_solution.csv or a 'filename wnid' text file")
    labels.add_argument("--devkit", help="ILSVRC2012_devkit_t12.tar.gz (labels and class names)")
    p.add_argument("--class-names", help="'id name' lines (LOC_synset_mapping.txt) for the manifest")
    p.add_argument("--out", required=True, help="output directory, or an object-store prefix (s3://bucket/prefix, "
                   "gs://...): shards are uploaded as they finish, the manifest last")
    p.add_argument("--stage", type=Path, help="with a remote --out: the local folder shards are written to before "
                   "their upload (default: a folder in the system's temporary directory, kept for a re-run)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=_positive, default=1000, help="samples per shard (default 1000)")
    size.add_argument("--shard-bytes", type=_positive, help="source bytes per shard instead of a count")
    p.add_argument("--resize-shorter", type=_positive, help="shrink so the shorter side is at most N (never upscales)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global training shuffle")
    p.add_argument("--augment-copies", type=int, default=0, help="bake K augmented copies per training image")
    p.add_argument("--augment-size", type=_positive, default=224, help="side of the baked copies")
    p.add_argument("--raw-pixels", action="store_true",
                   help="store decoded RGB pixels (PPM) instead of JPEG: no decoding in the loader, for "
                   "tiny images such as CIFAR's 32 px (about 3 KB per 32 px image)")
    p.add_argument("--reencode", action="store_true",
                   help="re-encode every JPEG at --quality, as FFCV's files do: about half the bytes and "
                   "decoding time of ILSVRC's originals, at the cost of a second lossy compression")
    p.add_argument("--restart-markers", action="store_true",
                   help="rewrite each JPEG losslessly (same pixels) with a restart marker after every 8x8 or "
                   "16x16 block, so that the loader decodes only the blocks a crop covers: about 6%% more bytes and "
                   "a quarter less time per ILSVRC crop; drops EXIF and ICC data (needs the built C library)")
    p.add_argument("--workers", type=_positive, default=usable_cpus(), help="default: the usable CPUs")
    p.add_argument("--num-tasks", type=_positive, default=1, help="split the work over N array tasks")
    p.add_argument("--task-id", type=int, default=0, help="this task's index, 0..N-1")
    p.set_defaults(func=_run_shards)


def _add_ffcv(subparsers) -> None:
    p = subparsers.add_parser(
        "ffcv",
        help="write FFCV train.beton / val.beton and a manifest (needs the ffcv extra)",
        description="Write FFCV files from the same sources as 'shards' (same global shuffle, same "
        "bad-input handling) or from existing shards, plus DIR/manifest.json. Re-running resumes.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--train", help="class folders, ILSVRC2012_img_train.tar, or a CIFAR-10/100 or STL-10 "
                        "binary .tar.gz (its training part)")
    source.add_argument("--from-shards", help="a directory written by 'shards', or its object-store prefix "
                        "(fetched to --stage first)")
    p.add_argument("--val", help="class folders, flat files, ILSVRC2012_img_val.tar, or the same binary .tar.gz "
                   "(its test part)")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--val-labels", help="LOC_val_solution.csv or a 'filename wnid' text file")
    labels.add_argument("--devkit", help="ILSVRC2012_devkit_t12.tar.gz (labels and class names)")
    p.add_argument("--class-names", help="'id name' lines (LOC_synset_mapping.txt) for the manifest")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--stage", type=Path, help="with a remote --from-shards: the local folder they are fetched to "
                   "(default: a folder in the system's temporary directory, kept for a re-run)")
    p.add_argument("--max-resolution", type=_positive, default=512, help="longer side at most N px (default 512)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--compress-probability", type=float, default=0.5,
                   help="share of images stored as JPEG, the rest as raw pixels (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global training shuffle")
    p.add_argument("--workers", type=_positive, default=usable_cpus(), help="default: the usable CPUs")
    p.set_defaults(func=_run_ffcv)


def _source_paths(args) -> dict:
    """The source options of 'shards' and 'ffcv' as absolute paths (array tasks may run elsewhere)."""
    names = ("train", "val", "val_labels", "devkit", "class_names")
    return {n: str(Path(getattr(args, n)).absolute()) if getattr(args, n) else None for n in names}


def _run_ffcv(args) -> int:
    from .ffcv_writer import FFCVParams, run

    if args.from_shards and (args.val or args.val_labels or args.devkit or args.class_names):
        raise ValueError("--from-shards takes everything from the shards; drop --val/--val-labels/--devkit/--class-names")
    sources = None
    if args.train:
        sources = PrepParams(**_source_paths(args), seed=args.seed)
    params = FFCVParams(args.max_resolution, args.quality, args.compress_probability, args.seed)
    from_shards = args.from_shards
    if from_shards and is_remote(from_shards):
        from_shards = download_dataset(from_shards, args.stage or default_stage(from_shards))
    run(args.out, params, args.workers, sources=sources, from_shards=Path(from_shards) if from_shards else None)
    return 0


def _run_shards(args) -> int:
    from .writer import run

    params = PrepParams(
        **_source_paths(args),
        shard_size=args.shard_size,
        shard_bytes=args.shard_bytes,
        resize_shorter=args.resize_shorter,
        quality=args.quality,
        seed=args.seed,
        augment_copies=args.augment_copies,
        augment_size=args.augment_size,
        raw_pixels=args.raw_pixels,
        reencode=args.reencode,
        restart_markers=args.restart_markers,
    )
    out = args.out if is_remote(args.out) else Path(args.out)
    run(params, out, args.workers, args.num_tasks, args.task_id, args.stage)
    return 0


def _run_finalize(args) -> int:
    if is_remote(args.out):
        RemoteOutput(args.out, args.stage).finalize()
    else:
        finalize(Path(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    synthetic.add_cli(subparsers)
    demo.add_cli(subparsers)
    _add_shards(subparsers)
    _add_ffcv(subparsers)
    p = subparsers.add_parser("finalize", help="merge the array tasks' records into manifest.json")
    p.add_argument("out", help="the directory or object-store prefix of 'shards --out'")
    p.add_argument("--stage", type=Path, help="with a remote OUT: a local folder for the records (default: temporary)")
    p.set_defaults(func=_run_finalize)
    p = subparsers.add_parser("verify", help="re-read every shard or FFCV file and check it against the manifest")
    p.add_argument("out", help="a prepared directory or object-store prefix (s3://, gs://, https://)")
    p.add_argument("--workers", type=_positive, default=usable_cpus())
    p.set_defaults(func=lambda a: verify.main(a.out, a.workers))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (SourceError, PrepError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 3

"""The data of the GPU report (``benchmarks/gpu_report.py``), prepared in its first step, outside
the timed ones.

    python -m benchmarks.gpu_report_data --out DIR/data [--cifar PATH] [--smoke]

It writes ``DIR/data/data.json``, which says where each step's data is and where it came from:
- CIFAR-10 as class folders (``train/`` and ``test/``; the seeds' recipe reads them) and as
  shards of raw pixels (``data_prep shards --raw-pixels``; the recipe ``configs/cifar10.yaml``
  reads them). From ``--cifar PATH`` (prepared shards, class folders ``train/`` and
  ``test/``, or the official binary archive), else (``--smoke``) tiny synthetic images, else
  ``../shared/data/cifar10-jpg.tar.gz`` when there, else none (the CIFAR-10 steps are skipped);
- JPEGs for ``bench_loader.py --src``: the 100 ILSVRC samples of
  ``../shared/data/imagenet-samples-100.tar`` when there, else 100 synthetic ILSVRC-like
  JPEGs of 333-500 px;
- the end-to-end runs' shards (``bench_train.py --shards`` and the DALI run): synthetic
  ILSVRC-like JPEGs of 333-500 px, 10 classes x 1,024 training and 102 validation images,
  as ``bench_train.py --synthetic-per-class 1024`` would prepare them.
``--smoke``: tiny synthetic images (tests never read ``../shared``).
Everything is written under DIR/data and reused by a later run (``data_prep`` resumes).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data_prep.plan import PrepParams  # noqa: E402
from data_prep.synthetic import SyntheticSpec, generate  # noqa: E402
from data_prep.writer import run as prepare  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
LOADER_REPLICATE = 30  # 100 images x 30: enough batches for bench_loader's defaults, as on the Results page
E2E_PER_CLASS = 1024  # the end-to-end runs' training JPEGs per class (10 classes): 40 updates of 256 an epoch


def extract(archive: Path, dest: Path) -> Path:
    """``archive`` unpacked into ``dest`` once (a marker file records a complete unpacking)."""
    done = dest / ".unpacked"
    if not done.exists():
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
        done.touch()
    return dest


def synthetic(dest: Path, spec: SyntheticSpec, workers: int) -> Path:
    """Synthetic images with the validation images moved into class folders ``test/<class>/``,
    CIFAR-10's layout, so that the smoke run reads what the real one reads."""
    if not (dest / "test").is_dir():
        generate(dest, spec, workers=workers)
        for line in (dest / "val_labels.txt").read_text().splitlines():
            name, label = line.split()
            (dest / "test" / label).mkdir(parents=True, exist_ok=True)
            (dest / "val" / name).rename(dest / "test" / label / name)
    return dest


def cifar_shards(args, train: Path, test: Path, workers: int) -> Path:
    shards = args.out / "cifar10-shards"
    prepare(PrepParams(train=str(train), val=str(test), shard_size=16 if args.smoke else 1000, raw_pixels=True),
            shards, workers=workers)
    return shards


def cifar_source(args, workers: int) -> tuple[str, Path | None, Path | None]:
    """(where from, class folders or None, prepared shards or None)."""
    if args.cifar is not None:
        path = args.cifar.resolve()
        if (path / "manifest.json").is_file():
            return f"{path} (prepared shards)", None, path
        if path.is_file():  # the binary archive: data_prep reads both splits from it
            return str(path), None, cifar_shards(args, path, path, workers)
        test = next((path / name for name in ("test", "val") if (path / name).is_dir()), None)
        if not (path / "train").is_dir() or test is None:
            raise SystemExit(f"--cifar {path}: neither prepared shards (manifest.json), class folders (train/ and "
                             f"test/) nor an archive")
        return str(path), path, cifar_shards(args, path / "train", test, workers)
    if args.smoke:
        spec = SyntheticSpec(num_classes=4, train_per_class=24, val_per_class=6, min_side=32, max_side=32, seed=1)
        folders = synthetic(args.out / "cifar-synthetic", spec, workers)
        return "synthetic 32 px images (--smoke)", folders, cifar_shards(args, folders / "train", folders / "test",
                                                                              workers)
    if (SHARED / "cifar10-jpg.tar.gz").is_file():
        folders = extract(SHARED / "cifar10-jpg.tar.gz", args.out / "cifar10-jpg") / "cifar10"
        return str(SHARED / "cifar10-jpg.tar.gz"), folders, cifar_shards(args, folders / "train", folders / "test",
                                                                         workers)
    return "none (no ../shared/data/cifar10-jpg.tar.gz; give --cifar PATH)", None, None


def loader_source(args, workers: int) -> tuple[str, Path, int]:
    """(where from, the folder for bench_loader.py --src, its --replicate)."""
    if args.smoke:
        spec = SyntheticSpec(num_classes=4, train_per_class=6, val_per_class=1, min_side=40, max_side=72, seed=2)
        return "24 synthetic 40-72 px JPEGs (--smoke)", synthetic(args.out / "loader-synthetic", spec, workers) / "train", 2
    if (SHARED / "imagenet-samples-100.tar").is_file():
        folder = extract(SHARED / "imagenet-samples-100.tar", args.out / "ilsvrc") / "imagenet-samples-100"
        return f"the 100 ILSVRC samples of {SHARED} x{LOADER_REPLICATE}", folder, LOADER_REPLICATE
    spec = SyntheticSpec(num_classes=10, train_per_class=10, val_per_class=1, min_side=333, max_side=500, seed=2)
    folder = synthetic(args.out / "loader-synthetic", spec, workers) / "train"
    return f"100 synthetic ILSVRC-like JPEGs of 333-500 px x{LOADER_REPLICATE}", folder, LOADER_REPLICATE


def end_to_end_shards(args, workers: int) -> tuple[str, Path]:
    """(what, prepared shards) for the end-to-end training runs: ``bench_train.py``'s synthetic
    JPEGs (its ``prepare_shards``: the same spec, at ``--synthetic-per-class 1024``, or its smoke size)."""
    spec = (SyntheticSpec(num_classes=4, train_per_class=16, val_per_class=4, min_side=40, max_side=72, seed=1)
            if args.smoke else SyntheticSpec(num_classes=10, train_per_class=E2E_PER_CLASS,
                                             val_per_class=E2E_PER_CLASS // 10, min_side=333, max_side=500, seed=1))
    images = args.out / "e2e-images"
    generate(images, spec, workers=workers)
    prepare(PrepParams(train=str(images / "train"), val=str(images / "val"), val_labels=str(images / "val_labels.txt"),
                       class_names=str(images / "LOC_synset_mapping.txt"), shard_size=16 if args.smoke else 1000),
            args.out / "e2e-shards", workers=workers)
    count = spec.num_classes * spec.train_per_class
    return f"{count:,} synthetic {spec.min_side}-{spec.max_side} px JPEGs", args.out / "e2e-shards"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the data and data.json")
    parser.add_argument("--cifar", type=Path, help="CIFAR-10: prepared shards, class folders or the binary archive")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic images")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workers = len(os.sched_getaffinity(0))
    with contextlib.redirect_stdout(sys.stderr):  # data_prep's messages; the summary alone to stdout
        cifar_from, folders, shards = cifar_source(args, workers)
        loader_from, loader_images, replicate = loader_source(args, workers)
        e2e_from, e2e_shards = end_to_end_shards(args, workers)
    counts = ""
    if shards is not None:
        splits = json.loads((shards / "manifest.json").read_text())["splits"]
        counts = f", {splits['train']['samples']:,} training / {splits['val']['samples']:,} test images"
    data = {"cifar_from": cifar_from, "cifar_folders": folders and str(folders), "cifar_shards": shards and str(shards),
            "loader_from": loader_from, "loader_images": str(loader_images), "loader_replicate": replicate,
            "e2e_shards": str(e2e_shards),
            "summary": f"CIFAR-10 from {cifar_from}{counts}; loader: {loader_from}; end to end: {e2e_from}"}
    (args.out / "data.json").write_text(json.dumps(data, indent=1))
    print(data["summary"])
    return data


if __name__ == "__main__":
    main()

"""``verify DIR``: re-read every shard (or FFCV file) and hold it against the manifest."""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import sys
import tempfile
from pathlib import Path

import webdataset as wds
from PIL import Image

from shards.dataset_index import FIELDS, INDEX_FILE, DatasetIndex
from shards.manifest import PrepError, load_manifest, sha256_file
from shards.store import Store, is_remote
from shards.tar_index import Entry, index_path, load_index, scan

from .encode import MAX_STORED_PIXELS, pillow_limit
from .transfer import fetch_shard


def verify_shard(directory: Path, shard: dict, num_classes: int, raw_pixels: bool = False,
                 index_entries: list[Entry] | None = None) -> list[str]:
    """``index_entries``: the shard's entries in the dataset's ``index.npz``, checked too."""
    path = directory / shard["name"]
    field, stored = ("ppm", "PPM") if raw_pixels else ("jpg", "JPEG")
    if not path.is_file():
        return [f"{path}: missing"]
    problems = []
    if path.stat().st_size != shard["bytes"]:
        problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
    if sha256_file(path) != shard["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest")
    members = scan(path)[0] if "index" in shard or index_entries is not None else None
    if "index" in shard and load_index(path) != members:
        problems.append(f"{index_path(path)}: missing, or does not match the shard's members; prepare the shards again")
    if index_entries is not None and not dataset_index_matches(index_entries, members):
        problems.append(f"{path.parent / INDEX_FILE}: its entries for {path.name} do not match the shard's members; "
                        "run 'python -m data_prep finalize' again")
    count = 0
    try:
        for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
            count += 1
            key = sample["__key__"]
            if not {field, "cls", "json"} <= sample.keys():
                problems.append(f"{path}: sample {key} lacks {sorted({field, 'cls', 'json'} - sample.keys())}")
                continue
            label = int(sample["cls"])
            if not 0 <= label < num_classes:
                problems.append(f"{path}: sample {key} has label {label}, outside 0..{num_classes - 1}")
            try:
                # The size from the header first: a default Pillow (the loader's) refuses, or
                # warns about, an image over its limit before decoding it.
                with pillow_limit(None), Image.open(io.BytesIO(sample[field])) as image:
                    fmt, mode, (width, height) = image.format, image.mode, image.size
                if fmt != stored or mode != "RGB":
                    problems.append(f"{path}: sample {key} is {fmt}/{mode}, not RGB {stored}")
                if width * height > MAX_STORED_PIXELS:
                    problems.append(f"{path}: sample {key} is {width}x{height}, over the {MAX_STORED_PIXELS} "
                                    "pixels the loader reads; prepare the shards again")
                    continue
                with Image.open(io.BytesIO(sample[field])) as image:
                    image.load()  # the whole image decodes, as the loader will decode it
            except Exception as exc:  # any decoder failure is a finding, not a crash
                problems.append(f"{path}: sample {key} does not decode ({exc})")
    except Exception as exc:
        problems.append(f"{path}: unreadable as a webdataset tar ({exc})")
    if count != shard["samples"]:
        problems.append(f"{path}: {count} samples, manifest says {shard['samples']}")
    return problems


def load_dataset_index(directory: Path | str, manifest: dict) -> tuple[DatasetIndex | None, list[str]]:
    """``index.npz`` checked against the manifest (size, sha256), and the problems found."""
    if not manifest.get("index"):
        return None, []
    store = Store(str(directory))
    name = manifest["index"]["name"]
    try:
        data = store.read(name)
    except FileNotFoundError:
        return None, [f"{store.shown(name)}: missing (listed in the manifest)"]
    if len(data) != manifest["index"]["bytes"] or hashlib.sha256(data).hexdigest() != manifest["index"]["sha256"]:
        return None, [f"{store.shown(name)}: differs from the manifest's size or sha256"]
    return DatasetIndex(data), []


def dataset_index_matches(index_entries: list[Entry], members: list[Entry]) -> bool:
    """Whether ``index.npz``'s entries of a shard are what walking its tar headers finds."""
    found = [(e.offset, e.length, e.fields) for e in index_entries]
    return found == [(e.offset, e.length, {f: v for f, v in e.fields.items() if f in FIELDS}) for e in members]


def _verify_job(args) -> list[str]:
    directory, shard, num_classes, raw_pixels, index_entries = args
    if not is_remote(directory):
        return verify_shard(directory, shard, num_classes, raw_pixels, index_entries)
    store = Store(str(directory))  # a shard at a time, through a temporary folder
    with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
        try:
            fetch_shard(store, shard, Path(tmp))
        except FileNotFoundError:
            return [f"{store.shown(shard['name'])}: missing"]
        problems = verify_shard(Path(tmp), shard, num_classes, raw_pixels, index_entries)
    return [p.replace(f"{tmp}/", f"{store.shown()}/") for p in problems]


def verify_beton(directory: Path, split: str, info: dict, num_classes: int) -> list[str]:
    """An FFCV file: size, sha256, sample count, and every image decoded with a valid label."""
    from shards.ffcv_files import read_images

    path = directory / info["file"]
    if not path.is_file():
        return [f"{path}: missing"]
    problems = []
    if path.stat().st_size != info["bytes"]:
        problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {info['bytes']}")
    if sha256_file(path) != info["sha256"]:
        problems.append(f"{path}: sha256 differs from the manifest")
        return problems  # the tables inside may be garbage: do not parse them
    count = 0
    for index, pixels, label in read_images(path):
        count += 1
        if pixels.ndim != 3 or pixels.shape[2] != 3 or min(pixels.shape[:2]) < 1:
            problems.append(f"{path}: sample {index} has shape {pixels.shape}")
        if not 0 <= label < num_classes:
            problems.append(f"{path}: sample {index} has label {label}, outside 0..{num_classes - 1}")
    if count != info["samples"]:
        problems.append(f"{path}: {count} samples, manifest says {info['samples']} ({split})")
    return problems


def verify(directory: Path | str, workers: int = 1) -> list[str]:
    """Problems found in a prepared folder, or an object-store prefix (each shard fetched once)."""
    directory = directory if is_remote(directory) else Path(directory)
    manifest = load_manifest(directory)
    num_classes = len(manifest["classes"])
    if manifest["format"] == "ffcv":
        if is_remote(directory):
            raise PrepError(f"{directory}: FFCV files are verified on a local or shared disk")
        return [p for split, info in manifest["splits"].items() for p in verify_beton(directory, split, info, num_classes)]
    raw_pixels = manifest["parameters"].get("raw_pixels", False)
    index, problems = load_dataset_index(directory, manifest)
    jobs = [(directory, s, num_classes, raw_pixels, index.entries(s["name"]) if index and s["name"] in index else None)
            for info in manifest["splits"].values() for s in info["shards"]]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_verify_job, jobs, chunksize=1)
    else:
        results = [_verify_job(j) for j in jobs]
    problems += [p for r in results for p in r]
    for split, info in manifest["splits"].items():
        if sum(s["samples"] for s in info["shards"]) != info["samples"]:
            problems.append(f"{directory}: {split} shard counts do not add up to {info['samples']}")
    return problems


def main(directory: Path, workers: int = 1) -> int:
    problems = verify(directory, workers)
    manifest = load_manifest(directory)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        print(f"verify: {len(problems)} problems in {directory}", file=sys.stderr)
        return 1
    if manifest["format"] == "ffcv":
        files = f"{len(manifest['splits'])} FFCV files"
    else:
        files = f"{sum(len(s['shards']) for s in manifest['splits'].values())} shards"
    print(f"verify: {files}, {manifest['totals']['samples']} samples OK in {directory}")
    return 0

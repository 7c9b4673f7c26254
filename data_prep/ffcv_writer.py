"""``python -m data_prep ffcv``: FFCV ``train.beton`` / ``val.beton`` plus the same manifest.

The samples are planned exactly as for the shards (same sources, same global training
shuffle, validation in source order) or taken from existing shards in their order. Every
input is screened first with the shards' own integrity check, so a file that cannot be
decoded is skipped and recorded with its reason, never handed to FFCV's writer (whose worker
processes would die on it and leave the writer waiting forever). The files themselves are
written by FFCV's ``DatasetWriter`` with its ImageNet settings: longer side at most
``--max-resolution``, a ``--compress-probability`` share stored as JPEG of ``--quality``,
the rest as raw pixels. Each split goes to ``NAME.beton.tmp`` and is renamed when complete,
then recorded in ``.parts/``; a re-run writes only the splits still missing. The original
name of every sample is listed, in file order, in ``NAME.names.txt``.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shards.ffcv_files import require_ffcv
from shards.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    PARTS_DIR,
    PrepError,
    atomic_write_json,
    claim_output,
    load_manifest,
    sha256_file,
)

from . import encode
from .plan import SPLITS, PrepParams, make_plan
from .sources import SampleRef


@dataclass(frozen=True)
class FFCVParams:
    """How the images are stored (FFCV's ImageNet example: 512 px, quality 90, half as JPEG)."""

    max_resolution: int = 512
    quality: int = 90
    compress_probability: float = 0.5
    seed: int = 0  # the JPEG/raw choice per image; the training shuffle's seed is the plan's

    def __post_init__(self):
        if self.max_resolution < 8:
            raise ValueError(f"invalid max_resolution: {self.max_resolution!r} (>= 8)")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"invalid quality: {self.quality!r} (1..100)")
        if not 0 <= self.compress_probability <= 1:
            raise ValueError(f"invalid compress_probability: {self.compress_probability!r} (0..1)")


@dataclass(frozen=True)
class Sample:
    ref: SampleRef
    label: int


# ----------------------------------------------------------------------------- what to write
def samples_from_sources(params: PrepParams) -> tuple[list[dict], dict[str, list[Sample]]]:
    """The shards' plan (global shuffle included), flattened per split."""
    if params.augment_copies:
        raise PrepError("--augment-copies is for shards only; FFCV files hold each image once")
    plan = make_plan(params)
    splits: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for shard in plan.shards:
        splits[shard.split] += [Sample(item.ref, item.label) for item in shard.items]
    return plan.classes, {s: v for s, v in splits.items() if v}


def samples_from_shards(directory: Path) -> tuple[dict, dict[str, list[Sample]]]:
    """Every sample of prepared shards, in their order, as byte ranges inside the tars."""
    manifest = load_manifest(directory)
    if manifest["format"] != "webdataset":
        raise PrepError(f"{directory / MANIFEST}: --from-shards needs WebDataset shards, found {manifest['format']}")
    if manifest["parameters"].get("augment_copies"):
        raise PrepError(f"{directory}: holds baked augmented copies; convert shards made without --augment-copies")
    splits: dict[str, list[Sample]] = {}
    for split, summary in manifest["splits"].items():
        samples = splits.setdefault(split, [])
        for shard in summary["shards"]:
            path = directory / shard["name"]
            if not path.is_file():
                raise PrepError(f"{path}: shard listed in the manifest is missing")
            samples += _shard_samples(path, manifest["classes"])
            if len(samples) != sum(s["samples"] for s in summary["shards"][: summary["shards"].index(shard) + 1]):
                raise PrepError(f"{path}: holds another number of samples than the manifest says")
    return manifest, splits


def _shard_samples(path: Path, classes: list[dict]) -> list[Sample]:
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = m
            found = []
            for key, parts in members.items():
                image = parts.get("jpg") or parts.get("ppm")  # ppm: shards of raw pixels (--raw-pixels)
                if image is None or not {"cls", "json"} <= parts.keys():
                    raise PrepError(f"{path}: sample {key} lacks one of jpg (or ppm), cls, json")
                label = int(tar.extractfile(parts["cls"]).read())
                meta = json.loads(tar.extractfile(parts["json"]).read())
                found.append(Sample(SampleRef(str(path), meta["name"], classes[label]["id"], image.offset_data, image.size), label))
    except (tarfile.TarError, OSError, ValueError, KeyError) as exc:
        raise PrepError(f"{path}: damaged shard ({exc}); check it with 'python -m data_prep verify'") from exc
    return found


# ----------------------------------------------------------------------------- screening
def _screen(sample: Sample) -> tuple[str | None, str | None]:
    """(skip reason, conversion) with the shards' integrity check (a cheap reduced decode for
    RGB JPEGs, a full one otherwise)."""
    try:
        result = encode.encode(sample.ref.read(), encode.EncodeSpec())
    except encode.BadImage as exc:
        return str(exc), None
    except OSError as exc:
        return f"unreadable: {exc}", None
    except Exception as exc:  # a decoder bug on one odd file must not stop the run
        return f"cannot decode: {type(exc).__name__}: {exc}", None
    return None, result.converted


def screen(samples: list[Sample], workers: int, split: str) -> tuple[list[Sample], list[dict], int]:
    kept, skipped, converted = [], [], 0
    with multiprocessing.get_context("fork").Pool(workers) as pool, \
            tqdm(total=len(samples), unit="img", desc=f"screening {split}", file=sys.stderr, disable=not samples) as bar:
        for sample, (reason, conversion) in zip(samples, pool.imap(_screen, samples, chunksize=64)):
            bar.update()
            if reason is not None:
                skipped.append({"split": split, "name": sample.ref.name, "reason": reason})
            else:
                kept.append(sample)
                converted += conversion is not None
    return kept, skipped, converted


# ----------------------------------------------------------------------------- writing
class _ScreenedImages:
    """What FFCV's writer reads: (HxWx3 uint8 array, label) for sample i."""

    def __init__(self, samples: list[Sample], params: FFCVParams):
        self.samples, self.params = samples, params

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        sample = self.samples[i]
        try:
            data = sample.ref.read()
            _, _, (width, height) = encode.header(data)
            scale = min(1.0, self.params.max_resolution / max(width, height))
            # libjpeg's reduced-scale decode down to (at least) the size FFCV will resize to.
            draft = (max(1, int(width * scale)), max(1, int(height * scale)))
            pixels = np.asarray(encode.to_rgb(encode.open_image(data, draft_size=draft)))
        except Exception as exc:
            # Screened already, so this is not expected; stop the run loudly rather than leave
            # FFCV's writer waiting for a sample its dead worker will never deliver.
            print(f"error: {sample.ref.name}: {exc}", file=sys.stderr, flush=True)
            os.kill(os.getppid(), signal.SIGTERM)
            os._exit(1)
        # The writer draws JPEG-or-raw from np.random in this process: seed it per sample so
        # the same inputs always give the same file.
        np.random.seed((self.params.seed * 1_000_003 + i) % 2**32)
        return pixels, sample.label


def write_beton(path: Path, samples: list[Sample], params: FFCVParams, workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(write_mode="proportion", max_resolution=params.max_resolution,
                               jpeg_quality=params.quality, compress_probability=params.compress_probability),
        "label": IntField(),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    DatasetWriter(str(tmp), fields, num_workers=workers).from_indexed_dataset(_ScreenedImages(samples, params))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_split(out: Path, split: str, samples: list[Sample], params: FFCVParams, workers: int,
                 screened: bool) -> dict:
    for stale in (out / PARTS_DIR).glob(f"{split}.json.tmp*"):
        stale.unlink()  # the record's temporary file, left by a run killed while it wrote it
    if screened:
        kept, skipped, converted = samples, [], 0
    else:
        kept, skipped, converted = screen(samples, workers, split)
    if not kept:
        raise PrepError(f"{out}: no {split} image could be decoded ({len(skipped)} skipped)")
    beton = out / f"{split}.beton"
    print(f"{split}: writing {len(kept)} images to {beton} with {workers} workers", file=sys.stderr)
    write_beton(beton, kept, params, workers)
    names = out / f"{split}.names.txt"
    names.write_text("".join(f"{s.ref.name}\n" for s in kept), encoding="utf-8")
    class_counts: dict[int, int] = {}
    for s in kept:
        class_counts[s.label] = class_counts.get(s.label, 0) + 1
    record = {
        "file": beton.name,
        "names": names.name,
        "samples": len(kept),
        "bytes": beton.stat().st_size,
        "sha256": sha256_file(beton),
        "found": len(samples),
        "written": len(kept),
        "skipped": len(skipped),
        "converted": converted,
        "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
        "skipped_files": skipped,
    }
    atomic_write_json(out / PARTS_DIR / f"{split}.json", record)
    return record


def _is_complete(out: Path, split: str) -> bool:
    record = out / PARTS_DIR / f"{split}.json"
    beton = out / f"{split}.beton"
    return record.is_file() and beton.is_file() and json.loads(record.read_text())["bytes"] == beton.stat().st_size


def run(out: Path, ffcv_params: FFCVParams, workers: int, *, sources: PrepParams | None = None,
        from_shards: Path | None = None) -> dict:
    """Write the .beton files that are missing, then the manifest; return the manifest."""
    require_ffcv()
    if (sources is None) == (from_shards is None):
        raise PrepError("give either the sources (--train/--val) or --from-shards")
    inherited_skips: list[dict] = []
    if from_shards is not None:
        shards_manifest, splits = samples_from_shards(Path(from_shards))
        classes = shards_manifest["classes"]
        inherited_skips = shards_manifest["skipped"]  # what the shards already left out
        origin = {"from_shards": str(Path(from_shards).absolute()), "source": shards_manifest["parameters"]}
    else:
        classes, splits = samples_from_sources(sources)
        origin = {"source": sources.to_json()}
    parameters = {**asdict(ffcv_params), **origin}
    # The plan summary identifies the output: same parameters, classes and sample order.
    order = hashlib.sha256("\n".join(f"{sp}\t{s.ref.name}\t{s.label}" for sp in splits for s in splits[sp]).encode())
    claim_output(out, {"parameters": parameters, "classes": classes, "order_sha256": order.hexdigest()})

    start = time.perf_counter()
    records = {}
    for split, samples in splits.items():
        if not _is_complete(out, split):
            records[split] = _write_split(out, split, samples, ffcv_params, workers, screened=from_shards is not None)
            elapsed = time.perf_counter() - start
            print(f"{split}: {records[split]['samples']} images in {elapsed:.1f}s", file=sys.stderr)
        else:
            records[split] = json.loads((out / PARTS_DIR / f"{split}.json").read_text())
            print(f"{split}: already complete ({out / records[split]['file']})", file=sys.stderr)
    skipped = inherited_skips + [s for r in records.values() for s in r["skipped_files"]]
    split_summaries = {}
    for split, r in records.items():
        summary = {k: v for k, v in r.items() if k != "skipped_files"}
        if from_shards is not None:  # count from the original sources, as the shards' manifest does
            summary["found"] += sum(1 for s in inherited_skips if s["split"] == split)
            summary["skipped"] = sum(1 for s in inherited_skips if s["split"] == split)
        split_summaries[split] = summary
    manifest = {
        "format": "ffcv",
        "version": FORMAT_VERSION,
        "classes": classes,
        "splits": split_summaries,
        "totals": {k: sum(s[k] for s in split_summaries.values()) for k in ("found", "written", "skipped", "samples", "bytes")},
        "skipped": skipped,
        "parameters": parameters,
    }
    atomic_write_json(out / MANIFEST, manifest)
    for split, s in split_summaries.items():
        print(f"{split}: found {s['found']}, written {s['written']}, skipped {s['skipped']}, converted "
              f"{s['converted']}; {s['samples']} samples in {s['file']} ({s['bytes'] / 1e6:.1f} MB)", file=sys.stderr)
    for s in skipped[:20]:
        print(f"  skipped {s['split']}/{s['name']}: {s['reason']}", file=sys.stderr)
    print(f"manifest: {out / MANIFEST}", file=sys.stderr)
    return manifest

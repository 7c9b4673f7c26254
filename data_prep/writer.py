"""Write shards: one worker process per shard at a time, atomically, resumably.

A shard is written as ``NAME.tmp<pid>``, fsynced and renamed; only then is its record written
to ``.parts/NAME.json``. A shard counts as done when both exist, so a run killed at any point
leaves nothing that looks finished, and re-running the same command writes only what is
missing. With an object store as the output, each shard is uploaded once written
(``transfer``). Tar headers carry fixed metadata, so the same plan always gives the same bytes (and
the same sha256), whichever task or run wrote it.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import sys
import tarfile
import time
from pathlib import Path

from tqdm import tqdm

from imaging import jpeg_region
from shards.manifest import PARTS_DIR, PrepError, atomic_write_json, claim_output, finalize
from shards.store import is_remote
from shards.tar_index import IndexBuilder, index_path

from . import encode
from .plan import Item, PrepParams, ShardPlan, make_plan
from .transfer import RemoteOutput

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(item: Item) -> str:
    """A key without dots (webdataset splits a name at its first dot), unique within the split.

    The position makes it unique; the sanitised stem keeps it readable. The original name is
    stored in the sample's ``json`` field."""
    stem = _UNSAFE.sub("_", Path(item.ref.name).stem).strip("_")[:64] or "image"
    key = f"{item.position:08d}_{stem}"
    return key if item.copy < 0 else f"{key}_copy{item.copy}"


class _HashingWriter(io.RawIOBase):
    """Hash the tar while it is written, instead of reading it back."""

    def __init__(self, raw):
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size


def _add(tar: tarfile.TarFile, name: str, payload: bytes, index: IndexBuilder) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o444
    header = tar.offset
    tar.addfile(info, io.BytesIO(payload))
    data = tar.offset - -(-len(payload) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # the data, padded, ends there
    index.add(name, header, data, len(payload))


def image_field(params: PrepParams) -> str:
    """The sample field (tar member extension) holding the image."""
    return "ppm" if params.raw_pixels else "jpg"


def _augmented_copy(data: bytes, item: Item, params: PrepParams) -> bytes:
    """One baked augmented sample: its own crop, interpolation, flip and photometric draws."""
    import numpy as np
    import torch
    from PIL import Image

    from imaging.crops import random_resized_crop
    from imaging.photometric import photometric_distort
    from imaging.specs import CropSpec, PhotometricSpec

    seed = params.seed * 1_000_003 + item.position
    image = encode.to_rgb(encode.open_image(data))
    crop = random_resized_crop(image, params.augment_size, CropSpec(), random.Random(seed))
    pixels = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1)
    generator = torch.Generator().manual_seed(seed)
    distorted = photometric_distort(pixels, PhotometricSpec(), generator)
    array = (distorted * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return encode.store(Image.fromarray(array), encode_spec(params))


def encode_spec(params: PrepParams) -> encode.EncodeSpec:
    return encode.EncodeSpec(params.resize_shorter, params.quality, params.raw_pixels, params.reencode,
                             params.restart_markers)


def _encode_item(data: bytes, item: Item, params: PrepParams) -> tuple[bytes, dict]:
    meta = {"name": item.ref.name, "class_id": item.ref.class_id}
    if item.copy >= 0:
        meta["copy"] = item.copy
        return _augmented_copy(data, item, params), meta
    result = encode.encode(data, encode_spec(params))
    if result.converted:
        meta["converted"] = result.converted
    return result.data, meta


def write_shard(out: Path, shard: ShardPlan, params: PrepParams) -> dict:
    final = out / shard.name
    for stale in [*out.glob(f"{shard.name}.tmp*"), *out.glob(f"{index_path(final).name}.tmp*"),
                  *(out / PARTS_DIR).glob(f"{shard.name}.json.tmp*")]:
        stale.unlink()  # left by a killed run: the shard's, its index's and its record's temporary files
    tmp = out / f"{shard.name}.tmp{os.getpid()}"
    skipped, class_counts, converted = [], {}, 0
    index, field = IndexBuilder(), image_field(params)
    with open(tmp, "wb") as raw:
        sink = _HashingWriter(raw)
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for item in shard.items:
                try:
                    jpeg, meta = _encode_item(item.ref.read(), item, params)
                except encode.BadImage as exc:
                    skipped.append({"split": shard.split, "name": item.ref.name, "reason": str(exc)})
                    continue
                except OSError as exc:
                    skipped.append({"split": shard.split, "name": item.ref.name, "reason": f"unreadable: {exc}"})
                    continue
                except Exception as exc:  # a decoder bug on one odd file must not stop the run
                    reason = f"cannot decode: {type(exc).__name__}: {exc}"
                    skipped.append({"split": shard.split, "name": item.ref.name, "reason": reason})
                    continue
                key = sample_key(item)
                _add(tar, f"{key}.{field}", jpeg, index)
                _add(tar, f"{key}.cls", str(item.label).encode(), index)
                _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode(), index)
                class_counts[item.label] = class_counts.get(item.label, 0) + 1
                converted += "converted" in meta
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, final)
    index.write(index_path(final), sink.size)  # before the record: a shard without its index is not done
    record = {
        "split": shard.split,
        "name": shard.name,
        "planned": len(shard.items),
        "samples": sum(class_counts.values()),
        "bytes": sink.size,
        "sha256": sink.sha.hexdigest(),
        "index": index_path(final).name,
        "converted": converted,
        "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
        "skipped": skipped,
    }
    atomic_write_json(out / PARTS_DIR / f"{shard.name}.json", record)
    return record


def is_complete(out: Path, shard: ShardPlan) -> bool:
    record_path = out / PARTS_DIR / f"{shard.name}.json"
    tar_path = out / shard.name
    if not (record_path.is_file() and tar_path.is_file()):
        return False
    return json.loads(record_path.read_text())["bytes"] == tar_path.stat().st_size


def _write_shard_job(args) -> dict:
    out, shard, params, remote = args
    record = write_shard(out, shard, params)
    if remote is not None:
        remote.upload(record)
    return record


def run(params: PrepParams, out: Path | str, workers: int = 1, num_tasks: int = 1, task_id: int = 0,
        stage: Path | None = None) -> dict | None:
    """Write this task's shards; with a single task, also finalize and return the manifest.
    ``out`` may be an object-store URL: then shards are staged in ``stage`` and uploaded."""
    remote = RemoteOutput(str(out), stage) if is_remote(out) else None
    if not 0 <= task_id < num_tasks:
        raise PrepError(f"--task-id {task_id} is outside 0..{num_tasks - 1}")
    if params.restart_markers and not jpeg_region.available():
        raise PrepError("--restart-markers rewrites JPEGs with the C library, which is not built here (or was "
                        "built by an older version): run 'python -m imaging.jpeg_region build' (needs gcc and "
                        "libjpeg62-turbo-dev)")
    plan = make_plan(params)  # every source problem surfaces here, before anything is written
    if remote is not None:
        remote.claim(plan.summary())
        out = remote.stage
    claim_output(out, plan.summary())
    mine = [s for i, s in enumerate(plan.shards) if i % num_tasks == task_id]
    uploaded = remote.completed() if remote is not None else set()
    pending = [s for s in mine if s.name not in uploaded] if remote is not None else \
        [s for s in mine if not is_complete(out, s)]
    images = sum(len(s.items) for s in pending)
    print(
        f"{len(plan.shards)} shards planned, {len(mine)} for task {task_id}/{num_tasks}, "
        f"{len(mine) - len(pending)} already complete; writing {len(pending)} ({images} samples) "
        f"with {workers} workers",
        file=sys.stderr,
    )
    start = time.perf_counter()
    jobs = [(out, s, params, remote) for s in pending]
    with tqdm(total=images, unit="img", desc="shards", disable=not images, file=sys.stderr) as bar:
        if workers <= 1:
            results = map(_write_shard_job, jobs)
            for record in results:
                bar.update(record["planned"])
        else:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                for record in pool.imap_unordered(_write_shard_job, jobs):
                    bar.update(record["planned"])
    elapsed = time.perf_counter() - start
    if images:
        print(f"wrote {images} samples in {elapsed:.1f}s ({images / elapsed:.0f} img/s)", file=sys.stderr)
    if num_tasks > 1:
        target = remote.store.shown() if remote is not None else out
        print(f"task {task_id} done; run 'python -m data_prep finalize {target}' after all tasks", file=sys.stderr)
        return None
    return remote.finalize() if remote is not None else finalize(out)

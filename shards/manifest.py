"""The manifest: the one JSON file that describes a prepared dataset.

``finalize`` merges the per-shard records (written by one run or by many array tasks) into
``manifest.json``. It holds nothing that depends on how the work was split (no timings, task
ids or worker counts), so an array job's manifest equals a single run's.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from .dataset_index import INDEX_FILE, pack, read_shard_index
from .store import Store, is_remote

MANIFEST = "manifest.json"
PLAN_FILE = ".plan.json"
PARTS_DIR = ".parts"
FORMAT_VERSION = 1
FORMATS = ("webdataset", "ffcv")  # shards (writer.py) or .beton files (ffcv_writer.py)


class PrepError(RuntimeError):
    """The preparation cannot go on (or a prepared directory is not what it should be)."""


def atomic_write_json(path: Path, data) -> None:
    """Write next to the target and rename: readers see the old file or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists (O_EXCL: atomic, also on NFS v3+ and
    Lustre, where flock may not work); False if it existed."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def load_manifest(directory: Path | str, store: Store | None = None) -> dict:
    """The manifest of a prepared dataset, in a folder or (``store``, or a URL) an object store."""
    if store is None and is_remote(directory):
        store = Store(str(directory))
    if store is not None and store.remote:
        path = store.shown(MANIFEST)
        try:
            text = store.read(MANIFEST).decode("utf-8", errors="replace")
        except FileNotFoundError:
            store.check_reachable()  # a missing bucket or wrong credentials say so first
            how = ("serve a folder prepared by 'python -m data_prep shards' there" if store.shown().startswith("http")
                   else f"prepare the data with 'python -m data_prep shards ... --out {store.shown()}'")
            raise PrepError(f"{path}: no manifest (a wrong prefix? {how})") from None
    else:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise PrepError(f"{path}: no manifest (prepare the data with 'python -m data_prep shards' or 'ffcv')")
        text = path.read_text(encoding="utf-8")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PrepError(f"{path}: not valid JSON ({exc})") from exc
    if manifest.get("format") not in FORMATS or manifest.get("version") != FORMAT_VERSION:
        raise PrepError(f"{path}: not a version-{FORMAT_VERSION} manifest of {' or '.join(FORMATS)} files")
    return manifest


def claim_output(out: Path, summary: dict) -> None:
    """Create ``out`` and record the plan; refuse to mix with a different earlier preparation."""
    plan_path = out / PLAN_FILE
    if plan_path.is_file():
        previous = json.loads(plan_path.read_text())
        if previous != summary:
            before, now = previous["parameters"], summary["parameters"]
            changed = [k for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]
            what = f"parameters differ: {', '.join(changed)}" if changed else "sources or shard layout have changed"
            raise PrepError(f"{out}: holds a preparation with a different plan ({what}); use another --out")
    elif out.exists() and any(not p.name.startswith((PARTS_DIR, PLAN_FILE)) for p in out.iterdir()):
        # (an array task that started a moment earlier may have made .parts and a .plan.json.tmp)
        raise PrepError(f"{out}: exists and is not empty; use another --out")
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_path, summary)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _split_summary(records: list[dict], augment_copies: int) -> dict:
    class_counts: dict[str, int] = {}
    for r in records:
        for label, n in r["class_counts"].items():
            class_counts[label] = class_counts.get(label, 0) + n
    skipped_names = {s["name"] for r in records for s in r["skipped"]}
    planned = sum(r["planned"] for r in records)
    copies = max(1, augment_copies) if records and records[0]["split"] == "train" else 1
    found = planned // copies
    return {
        "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256", "group", "index") if k in r} for r in records],
        "samples": sum(r["samples"] for r in records),
        "bytes": sum(r["bytes"] for r in records),
        "found": found,
        "written": found - len(skipped_names),
        "skipped": len(skipped_names),
        "converted": sum(r["converted"] for r in records) // copies,
        "augment_copies": augment_copies if copies > 1 else 0,
        "class_counts": dict(sorted(class_counts.items(), key=lambda kv: int(kv[0]))),
    }


def finalize(directory: Path, shards_uploaded: bool = False) -> dict:
    """Merge the shard records into ``manifest.json``; fail naming any shard still missing.
    ``shards_uploaded``: the shards live in an object store (``data_prep.upload``), and a
    record is written there only after its shard: the record alone says the shard is done."""
    directory = Path(directory)
    plan_path = directory / PLAN_FILE
    if not plan_path.is_file():
        raise PrepError(f"{directory}: no {PLAN_FILE}; run 'python -m data_prep shards' first")
    plan = json.loads(plan_path.read_text())
    records, missing = {}, []
    for shard in plan["shards"]:
        part = directory / PARTS_DIR / f"{shard['name']}.json"
        if part.is_file() and (shards_uploaded or (directory / shard["name"]).is_file()):
            record = json.loads(part.read_text())
            if shard["split"] == "train":  # the copy group the trainer reads it in (see plan.py)
                record["group"] = shard.get("group", 0)
            records.setdefault(shard["split"], []).append(record)
        else:
            missing.append(shard["name"])
    if missing:
        raise PrepError(
            f"{directory}: {len(missing)} of {len(plan['shards'])} shards are not complete "
            f"(first: {missing[0]}); re-run the same 'shards' command (or the missing array tasks)"
        )
    params = plan["parameters"]
    splits = {split: _split_summary(rs, params["augment_copies"]) for split, rs in records.items()}
    # A bad image baked into K augmented copies is skipped K times: record it once.
    unique = {(s["split"], s["name"]): s for rs in records.values() for r in rs for s in r["skipped"]}
    skipped = list(unique.values())
    manifest = {
        "index": _write_dataset_index(directory, records),
        "format": "webdataset",
        "version": FORMAT_VERSION,
        "classes": plan["classes"],
        "splits": splits,
        "totals": {k: sum(s[k] for s in splits.values()) for k in ("found", "written", "skipped", "samples", "bytes")},
        "skipped": skipped,
        "parameters": params,
    }
    atomic_write_json(directory / MANIFEST, manifest)
    _print_summary(directory, manifest)
    return manifest


def _write_dataset_index(directory: Path, records: dict[str, list[dict]]) -> dict | None:
    """``index.npz``: every shard's index in one file, so that a reader starts with one read."""
    shards = [r for rs in records.values() for r in rs]
    if not all("index" in r and (directory / r["index"]).is_file() for r in shards):
        return None  # shards of an older version: readers use the shards' own indexes
    data = pack([(r["name"], read_shard_index(directory / r["index"])) for r in shards])
    tmp = directory / f"{INDEX_FILE}.tmp{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, directory / INDEX_FILE)
    return {"name": INDEX_FILE, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _print_summary(directory: Path, manifest: dict) -> None:
    for split, s in manifest["splits"].items():
        print(
            f"{split}: found {s['found']}, written {s['written']}, skipped {s['skipped']}, "
            f"converted {s['converted']}; {s['samples']} samples in {len(s['shards'])} shards "
            f"({s['bytes'] / 1e6:.1f} MB)",
            file=sys.stderr,
        )
    for s in manifest["skipped"][:20]:
        print(f"  skipped {s['split']}/{s['name']}: {s['reason']}", file=sys.stderr)
    if len(manifest["skipped"]) > 20:
        print(f"  ... and {len(manifest['skipped']) - 20} more (see the manifest)", file=sys.stderr)
    print(f"manifest: {directory / MANIFEST}", file=sys.stderr)

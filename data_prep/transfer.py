"""Preparing straight into an object store (``--out s3://bucket/prefix``, ``gs://``).

Shards are written to a local staging folder as for a local ``--out`` and uploaded as each
finishes: the tar, its index, and only then its record (``.parts/NAME.json``), so a record in
the store says its shard is complete there. The manifest (and the dataset index) go last, so a
reader never sees a half-written dataset. Re-running the same command (or an array task) lists
the records once and writes only what is missing; the staged copy of a shard is deleted once
uploaded. ``finalize`` fetches the records the other array tasks uploaded, merges them as for
a local folder, and uploads the index and then the manifest.

The commands that need whole files (``verify``, ``ffcv --from-shards``) fetch them to a local
folder first (``fetch_shard``, ``download_dataset``).
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from shards.dataset_index import INDEX_FILE
from shards.manifest import MANIFEST, PARTS_DIR, PLAN_FILE, PrepError, atomic_write_json, finalize, load_manifest
from shards.remote import fetch_file
from shards.store import Store, redact
from shards.tar_index import INDEX_SUFFIX


def default_stage(url: str, plan: dict | None = None) -> Path:
    """A staging folder of this machine for ``url`` and its plan (the same on a re-run; another
    for another plan, so that a stale stage never meets a new preparation)."""
    key = url + json.dumps(plan, sort_keys=True) if plan is not None else url
    return Path(tempfile.gettempdir()) / "data_prep-stage" / hashlib.sha1(key.encode()).hexdigest()[:16]


class RemoteOutput:
    """An object-store prefix as the output of ``shards``, staged through a local folder."""

    def __init__(self, url: str, stage: Path | None = None, retry_s: float = 120.0):
        if urlsplit(url).scheme in ("http", "https"):
            raise PrepError(f"{redact(url)}: HTTP(S) locations are read-only; prepare into a folder or an s3:// or "
                            "gs:// prefix, and serve that")
        self.store = Store(url, retry_s)
        self.stage = Path(stage) if stage else None  # default: default_stage(url, plan), once the plan is known

    def claim(self, summary: dict) -> None:
        """Record the plan in the store; refuse a prefix holding anything else (as a local --out)."""
        self.store.check_reachable()
        try:
            previous = json.loads(self.store.read(PLAN_FILE))
        except FileNotFoundError:
            previous = None
        if previous is not None and previous != summary:
            raise PrepError(f"{self.store.shown()}: holds a preparation with a different plan; use another --out")
        self.stage = self.stage or default_stage(self.store.location, summary)
        if previous is None:
            # (array tasks that start together: another may have recorded the plan a moment ago)
            others = [n for n in self.store.list("") if n.rstrip("/") not in (PLAN_FILE, PARTS_DIR)]
            if others:
                raise PrepError(f"{self.store.shown()}: exists and is not empty; use another --out")
            self.store.put_bytes(json.dumps(summary, indent=1, sort_keys=True).encode(), PLAN_FILE)
            if json.loads(self.store.read(PLAN_FILE)) != summary:
                raise PrepError(f"{self.store.shown()}: another preparation with a different plan started at the "
                                "same time; use another --out")

    def completed(self) -> set[str]:
        """Names of the shards whose record is in the store (one listing)."""
        return {Path(name).name.removesuffix(".json") for name in self.store.list(PARTS_DIR)
                if name.endswith(".json")}

    def upload(self, record: dict) -> None:
        """A shard written to the stage: its tar, its index, then its record; then free the stage."""
        name = record["name"]
        tar = self.stage / name
        self.store.put_file(tar, name)
        self.store.put_file(self.stage / f"{name}{INDEX_SUFFIX}", f"{name}{INDEX_SUFFIX}")
        self.store.put_file(self.stage / PARTS_DIR / f"{name}.json", f"{PARTS_DIR}/{name}.json")
        tar.unlink()

    def finalize(self) -> dict:
        """The manifest of the uploaded shards, written to the store last."""
        try:
            plan = json.loads(self.store.read(PLAN_FILE))
        except FileNotFoundError:
            raise PrepError(f"{self.store.shown()}: no {PLAN_FILE}; run 'python -m data_prep shards' first") from None
        self.stage = self.stage or default_stage(self.store.location, plan)
        (self.stage / PARTS_DIR).mkdir(parents=True, exist_ok=True)
        (self.stage / PLAN_FILE).write_text(json.dumps(plan, indent=1, sort_keys=True))
        done = self.completed()
        for shard in plan["shards"]:  # what other array tasks uploaded, or an earlier stage lost
            name = shard["name"]
            if name not in done:  # written here but never uploaded (a failed upload): not done
                (self.stage / PARTS_DIR / f"{name}.json").unlink(missing_ok=True)
                continue
            for local, remote in ((self.stage / PARTS_DIR / f"{name}.json", f"{PARTS_DIR}/{name}.json"),
                                  (self.stage / f"{name}{INDEX_SUFFIX}", f"{name}{INDEX_SUFFIX}")):
                if not local.is_file():
                    local.write_bytes(self.store.read(remote))
        manifest = finalize(self.stage, shards_uploaded=True)
        if manifest.get("index"):
            self.store.put_file(self.stage / INDEX_FILE, INDEX_FILE)
        self.store.put_file(self.stage / MANIFEST, MANIFEST)
        print(f"uploaded: {self.store.shown(MANIFEST)}", file=sys.stderr)
        return manifest


def fetch_shard(store: Store, shard: dict, dest: Path) -> None:
    """A shard of the manifest and its index, from the store into folder ``dest``."""
    fetch_file(store, shard["name"], dest / shard["name"], shard["bytes"])
    if "index" in shard:
        try:
            (dest / shard["index"]).write_bytes(store.read(shard["index"]))
        except FileNotFoundError:
            pass  # verify reports it missing


def download_dataset(url: str, dest: Path, retry_s: float = 120.0) -> Path:
    """A local copy of the shards at ``url`` in ``dest`` (kept: a re-run fetches only what is
    missing or has another size than the manifest says)."""
    store = Store(url, retry_s)
    manifest = load_manifest(url, store)
    if manifest["format"] != "webdataset":
        raise PrepError(f"{store.shown(MANIFEST)}: not WebDataset shards")
    dest.mkdir(parents=True, exist_ok=True)
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    print(f"fetching {len(shards)} shards of {store.shown()} to {dest}", file=sys.stderr)
    for shard in shards:
        path = dest / shard["name"]
        if not (path.is_file() and path.stat().st_size == shard["bytes"]):
            fetch_shard(store, shard, dest)
    atomic_write_json(dest / MANIFEST, manifest)
    return dest

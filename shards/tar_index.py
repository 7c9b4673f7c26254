"""Where each sample of a WebDataset tar shard lies, so a loader reads a sample with one read.

Parsing a tar with ``tarfile`` costs more than decoding a small image, and a damaged tar cannot
be resynchronised: everything after the damage is lost. The index (``NAME.tar.idx`` beside the
shard, JSON) records each sample's key, the byte range of its members (headers included) and
where each member's data lies in that range. It is written with the shard at preparation;
for shards prepared without one, ``SampleReader`` builds it on the fly by walking the tar's
headers once (cached in the process).

Reading checks every member's tar header (magic, name, size) before handing out its data, so
a damaged region spoils only the samples it covers, each reported with its key.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

INDEX_SUFFIX = ".idx"
INDEX_VERSION = 1
BLOCK = 512
# webdataset's split of a member name into sample key and field: the basename's first dot.
_KEY_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class DamagedSample(Exception):
    """A sample that cannot be read from the shard; the message says why, ``key`` names it
    where that is known."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Entry:
    key: str | None  # None in a dataset index (``shards.dataset_index``): the headers name it
    offset: int  # of its first member's header
    length: int  # through the end of its last member's data
    fields: dict[str, tuple[int, int]]  # field -> (data offset from ``offset``, size)

    def to_json(self) -> list:
        return [self.key, self.offset, self.length, {f: list(v) for f, v in self.fields.items()}]

    @classmethod
    def from_json(cls, row: list) -> "Entry":
        key, offset, length, fields = row
        return cls(key, offset, length, {f: (v[0], v[1]) for f, v in fields.items()})


def index_path(shard: str | Path) -> Path:
    return Path(f"{shard}{INDEX_SUFFIX}")


class IndexBuilder:
    """Collects entries while a shard is written: ``add`` each member's (name, header offset,
    data offset, size) in order; consecutive members with the same key form one sample."""

    def __init__(self):
        self.entries: list[Entry] = []

    def add(self, name: str, header: int, data: int, size: int) -> None:
        match = _KEY_FIELD.match(name)
        if not match:
            return  # webdataset ignores a name without a field too
        key, field = match.groups()
        if self.entries and self.entries[-1].key == key:
            last = self.entries[-1]
            fields = dict(last.fields)
            fields[field] = (data - last.offset, size)
            self.entries[-1] = Entry(key, last.offset, data + size - last.offset, fields)
        else:
            self.entries.append(Entry(key, header, data + size - header, {field: (data - header, size)}))

    def write(self, path: Path, shard_bytes: int) -> None:
        payload = {"version": INDEX_VERSION, "shard_bytes": shard_bytes,
                   "samples": [e.to_json() for e in self.entries]}
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def load_index(shard: str | Path) -> list[Entry] | None:
    """The entries of the index beside ``shard``; None when there is none, it is unusable, or
    the shard no longer has the size it records (rewritten or cut after preparation: then its
    headers are walked instead)."""
    try:
        payload = json.loads(index_path(shard).read_text(encoding="utf-8"))
        shard_bytes = os.path.getsize(shard)
        if payload.get("version") != INDEX_VERSION or payload.get("shard_bytes") != shard_bytes:
            return None
        entries = [Entry.from_json(row) for row in payload["samples"]]
    except Exception:  # unreadable, not JSON, or JSON of another shape: walk the headers instead
        return None
    return entries if all(entry_fits(e, shard_bytes) for e in entries) else None


def entry_fits(entry: Entry, shard_bytes: int) -> bool:
    """Whether an index entry lies inside the shard, each field after a header inside the entry
    (a damaged index must not make a reader allocate or read what is not there)."""
    if not (isinstance(entry.offset, int) and isinstance(entry.length, int)
            and 0 <= entry.offset and 0 < entry.length and entry.offset + entry.length <= shard_bytes):
        return False
    return all(isinstance(start, int) and isinstance(size, int) and BLOCK <= start and 0 <= size
               and start + size <= entry.length for start, size in entry.fields.values())


def scan(shard: str | Path) -> tuple[list[Entry], str | None]:
    """Walk the tar's headers (no data read): the entries up to where it ends or breaks, and
    why it stops early (None when the archive ends cleanly)."""
    builder = IndexBuilder()
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.isfile():
                    builder.add(member.name, member.offset, member.offset_data, member.size)
    except Exception as exc:  # any tar or I/O failure: what follows cannot be located
        return builder.entries, f"{type(exc).__name__}: {exc}"
    return builder.entries, None


def header_ok(header: bytes, name: str, size: int) -> bool:
    """A USTAR tar header naming ``name`` (where it fits the name field; a longer name lives in
    an extended header before it) with data of ``size`` bytes: what locating the data relies on.
    (Cheaper than the header checksum, which covers fields the reader does not use.)"""
    if len(header) != BLOCK or header[257:262] != b"ustar":
        return False
    encoded = name.encode()
    if len(encoded) <= 100 and header[:100].rstrip(b"\0") != encoded:
        return False
    try:
        return int(header[124:136].rstrip(b"\0 ") or b"0", 8) == size
    except ValueError:  # a base-256 size (over 8 GB) or garbage
        return False


class SampleReader:
    """Samples of one shard by position, each with one read."""

    _scanned: dict[str, tuple[list[Entry], str | None]] = {}  # shards without an index, per process

    def __init__(self, shard: str, entries: list[Entry] | None = None):
        """``entries``: the shard's index when the caller has it (a dataset index, a cached copy)."""
        self.shard = shard
        entries = entries if entries is not None else load_index(shard)
        self.break_reason = None  # why a scanned shard stops before its last indexed sample
        if entries is None:
            if shard not in self._scanned:
                self._scanned[shard] = scan(shard)
            entries, self.break_reason = self._scanned[shard]
        self.entries = entries
        self.file = open(shard, "rb", buffering=0)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "SampleReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def key(self, position: int) -> str | None:
        return self.entries[position].key if position < len(self.entries) else None

    def read(self, position: int, wanted: tuple[str, ...] | None = None) -> dict[str, bytes]:
        """{field: bytes} of the sample at ``position`` (only the ``wanted`` fields it has, if
        given); raises DamagedSample."""
        if position >= len(self.entries):
            last = f", the last one read being {self.entries[-1].key}" if self.entries else ""
            if self.break_reason:
                raise DamagedSample(f"is unreadable: the tar breaks after sample {len(self.entries)} "
                                    f"({self.break_reason}){last}")
            raise DamagedSample(f"is missing: the shard ends after {len(self.entries)} samples{last}")
        entry = self.entries[position]
        blob = os.pread(self.file.fileno(), entry.length, entry.offset)
        return sample_fields(blob, entry, wanted)


def member_name(header: bytes) -> str | None:
    """The member name a USTAR header gives (prefix/name), None if it is not one."""
    if len(header) != BLOCK or header[257:262] != b"ustar":
        return None
    name, prefix = header[:100].rstrip(b"\0"), header[345:500].rstrip(b"\0")
    try:
        return (prefix + b"/" + name if prefix else name).decode()
    except UnicodeDecodeError:
        return None


def sample_fields(blob: bytes, entry: Entry, wanted: tuple[str, ...] | None = None) -> dict[str, bytes]:
    """{field: bytes} of one sample from the bytes of its entry, every member header checked;
    raises DamagedSample. An entry without a key (a dataset index keeps none) takes the key its
    headers name."""
    if len(blob) < entry.length:
        raise DamagedSample(f"is missing: the shard ends at byte {entry.offset + len(blob)}, inside it "
                            "(truncated shard)", entry.key)
    key, fields = entry.key, {}
    for field, (start, size) in entry.fields.items():
        if wanted is not None and field not in wanted:
            continue
        header = blob[start - BLOCK:start]
        if key is None:
            match = _KEY_FIELD.match(member_name(header) or "")
            key = match.group(1) if match and match.group(2) == field else None
        name = f"{key}.{field}" if key else f"its {field}"
        if key is None or not header_ok(header, name, size):
            raise DamagedSample(f"has a damaged tar header for {name} at byte {entry.offset + start - BLOCK} "
                                "(damaged shard)", key)
        fields[field] = blob[start:start + size]
    fields["__key__"] = key
    return fields

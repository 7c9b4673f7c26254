"""Enumerate the samples of an image collection without reading the images.

A source is resolved into a list of :class:`SampleRef`: where the bytes live (a file, or a
byte range inside an uncompressed tar) and the class id. Only headers are read here, so
indexing ``ILSVRC2012_img_train.tar`` (a tar of 1,000 per-class tars) touches a few hundred
MB of headers, never extracts anything to disk, and gives every worker random access to any
image with one ``pread``. CIFAR-10/100 and STL-10 binary archives (``.tar.gz`` of raw pixels)
are read by :mod:`data_prep.archives`. Any problem with a source raises :class:`SourceError` naming the
path, before any output is written.
"""
from __future__ import annotations

import csv
import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

WNID_PATTERN = re.compile(r"^n\d{8}$")


class SourceError(ValueError):
    """An input that cannot be used as given (missing, empty, damaged, inconsistent)."""


@dataclass(frozen=True)
class SampleRef:
    """One input file: ``path`` alone, or ``size`` bytes at ``offset`` inside the tar ``path``."""

    path: str
    name: str  # the original name, relative to the source root (recorded in each sample)
    class_id: str
    offset: int = -1
    size: int = -1

    def read(self) -> bytes:
        if self.offset < 0:
            with open(self.path, "rb") as f:
                return f.read()
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), self.size, self.offset)

    def source_size(self) -> int:
        return self.size if self.offset >= 0 else os.path.getsize(self.path)


def is_tar(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(".tar")


def _tar_members(path: Path, base_offset: int = 0, fileobj=None) -> Iterable[tarfile.TarInfo]:
    """Regular members of an uncompressed tar; offsets made absolute by ``base_offset``."""
    try:
        with tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj) as tar:
            for member in tar:
                if member.isfile():
                    member.offset_data += base_offset
                    yield member
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SourceError(f"{path}: damaged or unreadable tar archive ({exc})") from exc


class _Window(io.RawIOBase):
    """A read-only view of ``size`` bytes at ``start`` of a file, for tars inside a tar."""

    def __init__(self, f, start: int, size: int):
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        data = os.pread(self._f.fileno(), n, self._start + self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def scan_class_folders(root: Path) -> list[SampleRef]:
    """ImageFolder layout: ``root/<class>/<any depth>/<file>``; every visible file is a candidate
    (files that are not images are skipped later, with a record, rather than ignored here)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SourceError(f"{root}: no class folders found")
    refs = []
    for cls in classes:
        files = _visible_files(root / cls)
        if not files:  # dropping it would silently shift every later class index
            raise SourceError(f"{root / cls}: class folder holds no files")
        refs += [SampleRef(str(p), str(p.relative_to(root)), cls) for p in files]
    return refs


def scan_train_tar(path: Path) -> list[SampleRef]:
    """``ILSVRC2012_img_train.tar``: one ``<wnid>.tar`` member per class, each a tar of JPEGs."""
    refs: list[SampleRef] = []
    with open(path, "rb") as f:
        for inner in _tar_members(path):
            stem, ext = os.path.splitext(os.path.basename(inner.name))
            if ext.lower() != ".tar":
                raise SourceError(f"{path}: member {inner.name!r} is not a per-class tar")
            # A 512-byte buffer: tarfile reads one header per member and seeks past the data.
            window = io.BufferedReader(_Window(f, inner.offset_data, inner.size), buffer_size=512)
            for m in _tar_members(Path(f"{path}:{inner.name}"), inner.offset_data, window):
                refs.append(SampleRef(str(path), f"{stem}/{m.name}", stem, m.offset_data, m.size))
    if not refs:
        raise SourceError(f"{path}: archive holds no images")
    return refs


def scan_flat(path: Path) -> list[tuple[str, str, int, int]]:
    """Flat validation files: a folder or an uncompressed tar -> (path, name, offset, size)."""
    if is_tar(path):
        return [(str(path), m.name, m.offset_data, m.size) for m in _tar_members(path)]
    return [(str(p), str(p.relative_to(path)), -1, -1) for p in _visible_files(path)]


def read_val_labels(path: Path) -> dict[str, str]:
    """Validation labels keyed by file stem: a ``LOC_val_solution.csv``-style CSV
    (``ImageId,PredictionString`` whose first token is the wnid) or a two-column
    ``filename wnid`` text file."""
    if not path.is_file():
        raise SourceError(f"{path}: label file not found")
    labels: dict[str, str] = {}
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
            raise SourceError(f"{path}: expected a header 'ImageId,PredictionString'")
        for lineno, row in enumerate(rows[1:], start=2):
            if len(row) < 2 or not row[1].split():
                raise SourceError(f"{path}:{lineno}: expected 'ImageId,wnid ...', got {row!r}")
            labels[Path(row[0].strip()).stem] = row[1].split()[0]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise SourceError(f"{path}:{lineno}: expected 'filename class', got {line!r}")
            labels[Path(parts[0].strip()).stem] = parts[1]
    if not labels:
        raise SourceError(f"{path}: no labels found")
    return labels


def read_devkit(path: Path) -> tuple[dict[str, str], list[str]]:
    """``ILSVRC2012_devkit_t12.tar.gz`` -> (wnid -> human name, validation wnids in file order).

    Same parsing as torchvision's ``parse_devkit_archive`` (leaf synsets of ``meta.mat`` and the
    1-based ILSVRC ids of the ground-truth file), read straight from the archive: torchvision's
    helper insists on the official file's MD5 and writes a cache next to it."""
    import scipy.io

    try:
        with tarfile.open(path, "r:*") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            meta_bytes = tar.extractfile(members["meta.mat"]).read()
            gt_text = tar.extractfile(members["ILSVRC2012_validation_ground_truth.txt"]).read()
    except KeyError as exc:
        raise SourceError(f"{path}: devkit archive lacks {exc.args[0]}") from exc
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SourceError(f"{path}: damaged or unreadable devkit archive ({exc})") from exc
    synsets = scipy.io.loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
    leaves = [s for s in synsets if int(s[4]) == 0]  # num_children == 0: the 1,000 classes
    id_to_wnid = {int(s[0]): str(s[1]) for s in leaves}
    names = {str(s[1]): str(s[2]) for s in leaves}
    try:
        val_wnids = [id_to_wnid[int(v)] for v in gt_text.decode().split()]
    except (KeyError, ValueError) as exc:
        raise SourceError(f"{path}: ground truth names an unknown class id {exc}") from exc
    return names, val_wnids


def read_class_names(path: Path) -> dict[str, str]:
    """``LOC_synset_mapping.txt`` / ``synset_words.txt``: ``wnid human readable name`` lines."""
    if not path.is_file():
        raise SourceError(f"{path}: class-name file not found")
    names = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise SourceError(f"{path}:{lineno}: expected 'id name', got {line!r}")
            names[parts[0]] = parts[1].strip()
    return names


def labelled_flat(path: Path, labels: dict[str, str], labels_origin: str) -> list[SampleRef]:
    """Join flat files with their labels; every file needs a label and every label a file."""
    files = scan_flat(path)
    if not files:
        raise SourceError(f"{path}: no files found")
    stems = {Path(name).stem for _, name, _, _ in files}
    unlabelled = sorted(n for _, n, _, _ in files if Path(n).stem not in labels)
    missing = sorted(set(labels) - stems)
    if unlabelled or missing:
        detail = []
        if unlabelled:
            detail.append(f"{len(unlabelled)} files without a label (first: {unlabelled[0]!r})")
        if missing:
            detail.append(f"{len(missing)} labels without a file (first: {missing[0]!r})")
        raise SourceError(f"{path}: labels from {labels_origin} do not match the files: " + "; ".join(detail))
    return [SampleRef(p, n, labels[Path(n).stem], off, size) for p, n, off, size in files]

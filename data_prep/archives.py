"""CIFAR-10, CIFAR-100 and STL-10 read straight from their binary ``.tar.gz`` archives.

The archives hold raw pixels, not image files, and no pickles are involved (the "binary
version" of each dataset, not the "python version"):

- ``cifar-10-binary.tar.gz``: ``data_batch_1.bin`` .. ``data_batch_5.bin`` (train) and
  ``test_batch.bin`` (test), records of 1 label byte + 3,072 pixel bytes (the red, green and
  blue planes of a 32x32 image, each row-major); class names in ``batches.meta.txt``.
- ``cifar-100-binary.tar.gz``: ``train.bin`` and ``test.bin``, records of a coarse label byte,
  a fine label byte and 3,072 pixel bytes; the (fine) class names in ``fine_label_names.txt``.
  Samples are labelled with the 100 fine classes.
- ``stl10_binary.tar.gz``: ``train_X.bin`` / ``train_y.bin`` (5,000 labelled images) and
  ``test_X.bin`` / ``test_y.bin`` (8,000), images of 3 planes of 96x96 bytes each stored
  column-major, labels one byte each, 1..10; class names in ``class_names.txt``.
  ``unlabeled_X.bin`` is not used.

The split is chosen by the option that names the archive: ``--train ARCHIVE`` reads its
training part, ``--val ARCHIVE`` its test part, so one archive given to both options gives
the usual train/test pair. The archive is read as a stream (gzip cannot seek), once per
option, keeping only the members the split needs; each image becomes a :class:`PixelRef`
whose ``read()`` returns a lossless PNG, so the rest of preparation (plan, shuffle, shards,
records, resumption, array tasks) treats it like any image file.

Class ids are the archive's class names. The plan numbers classes in sorted order of their
ids; the official name lists of all three datasets are in alphabetical order, so the
prepared labels equal the archives' own labels (a repacked archive with names out of order
still gets the right name for every label, under another number).
"""
from __future__ import annotations

import io
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from .sources import SampleRef, SourceError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
SPLIT_OF_OPTION = {"train": "train", "val": "test"}  # --train reads the training part, --val the test part
# The official archives hold at most a readme before their data: an archive whose first members
# belong to none of the datasets is something else, refused without reading it to its end.
MAX_FOREIGN_MEMBERS = 16


@dataclass(frozen=True)
class PixelRef(SampleRef):
    """One image held as raw RGB pixels (height x width x 3, row-major) taken from an archive."""

    pixels: bytes = field(default=b"", repr=False, compare=False)
    height: int = 0
    width: int = 0

    def read(self) -> bytes:
        """The image as a PNG file: lossless, and decoded like any other input by preparation."""
        from PIL import Image

        image = Image.frombytes("RGB", (self.width, self.height), self.pixels)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)  # transient: speed over size
        return buffer.getvalue()

    def source_size(self) -> int:
        return len(self.pixels)


@dataclass(frozen=True)
class Layout:
    """One dataset's archive: which members hold each split, how a record is laid out."""

    dataset: str
    names_member: str
    splits: dict[str, tuple[str, ...]]  # split -> image members (CIFAR) or (X, y) members (STL-10)
    other_members: tuple[str, ...]  # members that also identify the dataset, not read
    side: int
    label_bytes: int = 0  # CIFAR: label bytes before each record's pixels; the last one is used
    column_major: bool = False

    def members(self) -> set[str]:
        return {self.names_member, *self.other_members, *(m for ms in self.splits.values() for m in ms)}


LAYOUTS = (
    Layout("CIFAR-10", "batches.meta.txt",
           {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
           (), side=32, label_bytes=1),
    Layout("CIFAR-100", "fine_label_names.txt", {"train": ("train.bin",), "test": ("test.bin",)},
           ("coarse_label_names.txt",), side=32, label_bytes=2),
    Layout("STL-10", "class_names.txt",
           {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")},
           ("unlabeled_X.bin", "fold_indices.txt"), side=96, column_major=True),
)


def is_dataset_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def scan_archive(path: Path, option: str) -> list[PixelRef]:
    """The images of the split that ``option`` ('train' or 'val') selects, in archive order."""
    split = SPLIT_OF_OPTION[option]
    layout, members = read_members(path, split)
    names = class_names(path, layout, members[layout.names_member])
    if layout.column_major:
        x_member, y_member = layout.splits[split]
        return stl_images(path, layout, x_member, members[x_member], y_member, members[y_member], names)
    refs: list[PixelRef] = []
    for member in layout.splits[split]:
        refs += cifar_images(path, layout, member, members[member], names)
    return refs


def layout_of(member: str) -> Layout | None:
    for layout in LAYOUTS:
        if member in layout.members():
            return layout
    return None


def read_members(path: Path, split: str) -> tuple[Layout, dict[str, bytes]]:
    """Stream the archive once and keep the members that ``split`` needs, keyed by file name.

    The dataset is recognised by the first member that belongs to one; members of another
    dataset's layout, or a needed member missing at the end, are errors."""
    layout: Layout | None = None
    found: dict[str, bytes] = {}
    current, foreign = "the archive header", 0
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                current = info.name
                name = PurePosixPath(info.name).name
                if not info.isfile():
                    continue
                owner = layout_of(name)
                if owner is None:  # a readme
                    foreign += 1
                    if layout is None and foreign >= MAX_FOREIGN_MEMBERS:
                        break
                    continue
                if layout is None:
                    layout = owner
                elif owner is not layout:
                    raise SourceError(f"{path}: member {info.name!r} belongs to {owner.dataset}, but the archive "
                                      f"was recognised as {layout.dataset}")
                if name == layout.names_member or name in layout.splits[split]:
                    found[name] = tar.extractfile(info).read()
                    if len(found) == len(layout.splits[split]) + 1:
                        break  # everything needed is read: the rest of the stream (unlabelled STL-10) is not
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise SourceError(f"{path}: damaged or unreadable archive (at member {current!r}: {exc})") from exc
    if layout is None:
        known = ", ".join(layout.dataset for layout in LAYOUTS)
        raise SourceError(f"{path}: not a binary archive of {known} (none of their members found; the "
                          f"'python version' archives are pickles and are not read; an archive of image "
                          f"folders must be unpacked first: tar -xzf it and give the folder)")
    missing = [m for m in (layout.names_member, *layout.splits[split]) if m not in found]
    if missing:
        raise SourceError(f"{path}: {layout.dataset} archive lacks member {missing[0]!r} (its {split} split "
                          f"needs {', '.join(layout.splits[split])} and {layout.names_member}); damaged or incomplete?")
    return layout, found


def class_names(path: Path, layout: Layout, text: bytes) -> list[str]:
    try:
        names = [line.strip() for line in text.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path}: member {layout.names_member!r} is not text ({exc})") from exc
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if not names or duplicates:
        problem = f"repeats {duplicates[0]!r}" if duplicates else "is empty"
        raise SourceError(f"{path}: member {layout.names_member!r} (class names) {problem}")
    return names


def cifar_images(path: Path, layout: Layout, member: str, data: bytes, names: list[str]) -> list[PixelRef]:
    pixels = 3 * layout.side * layout.side
    record = layout.label_bytes + pixels
    if not data or len(data) % record:
        raise SourceError(f"{path}: member {member!r} holds {len(data)} bytes, not a whole number of "
                          f"{record}-byte {layout.dataset} records (damaged?)")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
    labels = records[:, layout.label_bytes - 1].astype(np.int64)  # CIFAR-100: the fine label, after the coarse one
    # Planes (3, H, W) -> pixels (H, W, 3)
    images = records[:, layout.label_bytes:].reshape(-1, 3, layout.side, layout.side).transpose(0, 2, 3, 1)
    return refs_for(path, member, images, labels, names)


def stl_images(path: Path, layout: Layout, x_member: str, x_data: bytes, y_member: str, y_data: bytes,
               names: list[str]) -> list[PixelRef]:
    pixels = 3 * layout.side * layout.side
    if not x_data or len(x_data) % pixels:
        raise SourceError(f"{path}: member {x_member!r} holds {len(x_data)} bytes, not a whole number of "
                          f"{pixels}-byte {layout.side}x{layout.side} images (damaged?)")
    count = len(x_data) // pixels
    if len(y_data) != count:
        raise SourceError(f"{path}: member {y_member!r} holds {len(y_data)} labels for the {count} images "
                          f"of {x_member!r}")
    # Each channel is stored column-major: plane[c][x][y]. (N, 3, W, H) -> (N, H, W, 3)
    images = np.frombuffer(x_data, dtype=np.uint8).reshape(-1, 3, layout.side, layout.side).transpose(0, 3, 2, 1)
    labels = np.frombuffer(y_data, dtype=np.uint8).astype(np.int64) - 1  # STL-10 labels run 1..10
    return refs_for(path, x_member, images, labels, names, label_offset=1)


def refs_for(path: Path, member: str, images: np.ndarray, labels: np.ndarray, names: list[str],
             label_offset: int = 0) -> list[PixelRef]:
    """One PixelRef per image; ``labels`` index ``names`` (the archive stores them + ``label_offset``)."""
    outside = np.flatnonzero((labels < 0) | (labels >= len(names)))
    if outside.size:
        i = int(outside[0])
        raise SourceError(f"{path}: member {member!r}, image {i}: label {int(labels[i]) + label_offset} is outside "
                          f"{label_offset}..{len(names) - 1 + label_offset} (the archive's {len(names)} class names)")
    stem = PurePosixPath(member).stem
    _, height, width, _ = images.shape
    return [PixelRef(str(path), f"{stem}/{i:05d}.png", names[label], pixels=np.ascontiguousarray(image).tobytes(),
                     height=height, width=width)
            for i, (image, label) in enumerate(zip(images, labels.tolist()))]

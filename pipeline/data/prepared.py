"""What a prepared dataset is to the trainer, and which samples each (rank, loader worker) slot reads.

Both splits are cut the same way: the shards, in an order (reshuffled every epoch for
training, the same permutation on every rank), are seen as one sequence of samples whose
length the manifest gives, and every (rank, loader worker) slot reads its own contiguous
range of it, skipping into its first shard and stopping inside its last. So no sample is
read twice, no slot runs short, and no shard needs to be split evenly.

Reading: each sample is one read at the offset the shard's index gives (``shards.tar_index``,
written at preparation, built on the fly for older shards), its tar headers checked.

Damage: a sample that cannot be read (a shard damaged after preparation, an image that does not
decode) never raises in a loader worker: it becomes a ``Skipped`` record (shard, position, key,
reason) and the trainer applies ``data.on_bad_sample``.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from torch.utils.data import get_worker_info

from shards.dataset_index import DatasetIndex
from shards.manifest import MANIFEST, PrepError, load_manifest
from shards.remote import RemoteShards, ShardCache
from shards.store import Store, is_remote
from shards.tar_index import DamagedSample, SampleReader


def mix_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    group: int = 0  # baked copies: the copy this training shard holds, read in the epochs e with e mod K == group
    name: str = ""  # in the dataset's location (a remote shard's key)
    bytes: int = 0
    sha256: str = ""
    remote: RemoteShards | None = dataclasses.field(default=None, compare=False, repr=False)  # None: a local file


@dataclass(frozen=True)
class PreparedData:
    directory: Path | str  # a folder, or the URL of an object-store prefix as shown (no user:password@, no query)
    classes: list[dict]
    train: list[Shard]
    val: list[Shard]
    augment_copies: int
    augment_size: int
    format: str = "webdataset"  # or "ffcv": then train and val are one .beton file each
    remote: RemoteShards | None = dataclasses.field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_samples(self) -> int:
        return sum(s.samples for s in self.train)

    @property
    def val_samples(self) -> int:
        return sum(s.samples for s in self.val)


@dataclass(frozen=True)
class RemoteOptions:
    """How a dataset in an object store is read (``data.remote_retry_s``, ``data.cache_*``)."""
    retry_s: float = 120.0
    cache_dir: str | None = None
    cache_max_gb: float = 200.0
    cache_min_free_gb: float | None = None  # None: 10% of the cache's disk
    requester_pays: bool = False

    @classmethod
    def from_config(cls, data) -> "RemoteOptions":
        """The options a ``DataConfig`` (the trainer's ``data`` section) sets."""
        return cls(data.remote_retry_s, data.cache_dir, data.cache_max_gb, data.cache_min_free_gb,
                   data.requester_pays)


def open_prepared(directory: str | Path, remote: RemoteOptions | None = None) -> PreparedData:
    """Read the manifest and check that every shard (or .beton file) it names is there. In an
    object store: two reads (the manifest and the dataset index), nothing per shard."""
    if is_remote(directory):
        return _open_remote(str(directory), remote or RemoteOptions())
    directory = Path(directory)
    manifest = load_manifest(directory)
    splits = manifest["splits"]
    _check_splits(splits, directory / MANIFEST)
    files = {}
    for split in ("train", "val"):
        listed = splits[split]["shards"] if manifest["format"] == "webdataset" else [splits[split]]
        files[split] = []
        for s in listed:
            path = directory / s.get("name", s.get("file"))
            if not path.is_file():
                what = "shard" if manifest["format"] == "webdataset" else "file"
                raise PrepError(f"{path}: {what} listed in the manifest is missing")
            files[split].append(Shard(str(path), s["samples"], s.get("group", 0), path.name, s["bytes"], s["sha256"]))
    return _prepared(directory, manifest, files, None)


def _check_splits(splits: dict, manifest: Path | str) -> None:
    for split in ("train", "val"):
        if split not in splits or not splits[split].get("shards", [splits[split].get("file")]):
            raise PrepError(f"{manifest}: no {split} shards (prepare them with --{split})")


def _prepared(directory, manifest: dict, files: dict[str, list[Shard]], remote) -> PreparedData:
    params = manifest["parameters"]
    copies = params.get("augment_copies", 0)
    check_groups(files["train"], copies, f"{directory}/{MANIFEST}")
    return PreparedData(directory, manifest["classes"], files["train"], files["val"],
                        copies, params.get("augment_size", 0), manifest["format"], remote)


def _open_remote(location: str, options: RemoteOptions) -> PreparedData:
    store = Store(location, options.retry_s, requester_pays=options.requester_pays)
    manifest = load_manifest(location, store)
    if manifest["format"] != "webdataset":
        raise PrepError(f"{store.shown(MANIFEST)}: FFCV files are read from a local or shared disk; "
                        "copy them there (the trainer streams WebDataset shards from object stores)")
    _check_splits(manifest["splits"], store.shown(MANIFEST))
    index = None
    if manifest.get("index"):
        name = manifest["index"]["name"]
        try:
            data = store.read(name)
        except FileNotFoundError:
            raise PrepError(f"{store.shown(name)}: listed in the manifest but missing") from None
        if hashlib.sha256(data).hexdigest() != manifest["index"]["sha256"]:
            raise PrepError(f"{store.shown(name)}: differs from the sha256 in the manifest (written by another "
                            "preparation?); run 'python -m data_prep finalize' again")
        index = DatasetIndex(data)
    cache = None
    if options.cache_dir:
        min_free = None if options.cache_min_free_gb is None else int(options.cache_min_free_gb * 1e9)
        cache = ShardCache(Path(options.cache_dir), int(options.cache_max_gb * 1e9), min_free)
    remote = RemoteShards(store, index, cache)
    files = {split: [Shard(store.shown(s["name"]), s["samples"], s.get("group", 0), s["name"], s["bytes"],
                           s["sha256"], remote) for s in manifest["splits"][split]["shards"]]
             for split in ("train", "val")}
    return _prepared(store.shown(), manifest, files, remote)  # the store keeps the URL that reads


def check_groups(shards: list[Shard], augment_copies: int, manifest: Path | str) -> None:
    """Baked copies: groups 0..K-1, all the same size (a bad image is skipped in every copy),
    so that every epoch is one pass over the same source images."""
    sizes: dict[int, int] = {}
    for shard in sorted(shards, key=lambda s: s.group):
        sizes[shard.group] = sizes.get(shard.group, 0) + shard.samples
    expected = list(range(max(1, augment_copies)))
    if list(sizes) != expected or len(set(sizes.values())) > 1:
        raise PrepError(
            f"{manifest}: training shards should form copy groups {expected} of equal size, found "
            f"{sizes} (samples per group); prepare the shards again with this version of data_prep"
        )


def worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


IGNORE_LABEL = -100  # cross_entropy's default ignore_index: the label of a skipped sample's slot
IMAGE_FIELDS = ("jpg", "ppm")  # a JPEG, or raw RGB pixels (shards prepared with --raw-pixels)


class Sample(NamedTuple):
    key: str
    data: bytes  # the encoded image (JPEG, or a PPM of raw pixels)
    label: int
    shard: str
    index: int  # position in the shard


class Skipped(NamedTuple):
    """A sample that cannot be used, and why: it is recorded, never dropped silently."""
    shard: str
    index: int  # position in the shard
    key: str | None  # None where a damaged tar lost it
    reason: str

    def record(self, split: str) -> dict:
        return {"split": split, "shard": self.shard, "index": self.index, "key": self.key, "reason": self.reason}


class BadSampleError(RuntimeError):
    """A sample that cannot be read, where the policy is to stop; the message names it and the fix."""


def bad_sample_message(record: dict, directory: Path | str) -> str:
    where = f"sample {record['key']}" if record["key"] else f"sample #{record['index']}"
    return (f"{record['shard']}: {record['split']} {where} {record['reason']}; check the shards with "
            f"'python -m data_prep verify {directory}'")


def checked(sample: dict, shard: str, index: int, num_classes: int) -> Sample | Skipped:
    key = sample["__key__"]
    image = next((sample[field] for field in IMAGE_FIELDS if field in sample), None)
    missing = [field for field, value in (("jpg", image), ("cls", sample.get("cls"))) if value is None]
    if missing:
        return Skipped(shard, index, key, f"lacks {', '.join(missing)} (damaged shard)")
    try:
        label = int(sample["cls"])
    except ValueError:
        return Skipped(shard, index, key, f"has an unreadable label {sample['cls'][:20]!r} (damaged shard)")
    if not 0 <= label < num_classes:
        return Skipped(shard, index, key, f"has label {label}, outside 0..{num_classes - 1}")
    return Sample(key, image, label, shard, index)


def shard_range(shard: Shard, first: int, last: int, num_classes: int) -> Iterator[Sample | Skipped]:
    """Samples ``first``..``last - 1`` of one shard: exactly ``last - first`` items, each a Sample
    or a Skipped. Never raises on damage. Each sample is read at its offset in the shard's index,
    so damage spoils only the samples it covers; a shard without an index (prepared by an older
    version) is indexed by walking its tar headers, and where that walk breaks the samples after
    it cannot be located, so they are recorded as unreadable. A shard in an object store is read
    in a few large ranged reads (``shards.remote``); a store that fails raises StoreError."""
    wanted = IMAGE_FIELDS + ("cls",)  # not the json metadata
    if shard.remote is not None:  # not a generator of its own: the first read is sent now
        return _CheckedRemote(shard.remote.samples(shard.name, shard.sha256, shard.bytes, first, last, wanted),
                               shard.url, num_classes)
    return _local_range(shard, first, last, num_classes, wanted)


class _CheckedRemote:
    """A remote range's (position, fields) as Sample or Skipped items; ``start()`` sends its
    first reads (``webdataset_input.start_reads``)."""

    def __init__(self, results, url: str, num_classes: int):
        self.results, self.url, self.num_classes = results, url, num_classes

    def start(self) -> None:
        start = getattr(self.results, "start", None)  # a range read from the cache has nothing to send
        if start is not None:
            start()

    def __iter__(self):
        return self

    def __next__(self) -> Sample | Skipped:
        i, fields = next(self.results)
        if isinstance(fields, DamagedSample):
            return Skipped(self.url, i, fields.key, str(fields))
        return checked(fields, self.url, i, self.num_classes)


def _local_range(shard: Shard, first: int, last: int, num_classes: int, wanted: tuple[str, ...]):
    try:
        reader = SampleReader(shard.url)
    except Exception as exc:  # the shard cannot be opened or walked at all
        for i in range(first, last):
            yield Skipped(shard.url, i, None, f"is unreadable: {type(exc).__name__}: {exc}")
        return
    with reader:
        for i in range(first, last):
            try:
                fields = reader.read(i, wanted)
            except (DamagedSample, OSError) as exc:
                yield Skipped(shard.url, i, reader.key(i), str(exc))
                continue
            yield checked(fields, shard.url, i, num_classes)


def sample_range(shards: list[Shard], start: int, stop: int, num_classes: int):
    """Samples ``start``..``stop - 1`` of the concatenated shards (Sample or Skipped each),
    opening only those needed."""
    offset = 0
    for shard in shards:
        first, last = max(offset, start) - offset, min(offset + shard.samples, stop) - offset
        if first < last:
            yield from shard_range(shard, first, last, num_classes)
        offset += shard.samples


def equal_ranges(total: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering 0..total, sizes differing by at most one."""
    bounds = [total * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))

"""Decide, deterministically, which sample goes into which shard.

The plan depends only on the sources and the parameters, so every SLURM array task computes
the same plan on its own and writes its share of the shards, and a re-run after a kill knows
exactly which shards are still missing.

Training samples are shuffled globally (ILSVRC's archive is grouped by class). With baked
copies (``augment_copies`` K) the training shards form K groups, consecutive runs of shards:
group k holds copy k of every source image, in its own seeded shuffle, so the trainer's epoch
e reads group e mod K and sees every source image exactly once.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import resolve, sources
from .sources import SampleRef, SourceError

SPLITS = ("train", "val")


@dataclass(frozen=True)
class PrepParams:
    """Everything that determines the output (worker and task counts do not)."""

    train: str
    val: str | None = None
    val_labels: str | None = None
    devkit: str | None = None
    class_names: str | None = None
    shard_size: int = 1000  # samples per shard
    shard_bytes: int | None = None  # if set: cut shards by source bytes instead
    resize_shorter: int | None = None
    quality: int = 90
    seed: int = 0
    augment_copies: int = 0
    augment_size: int = 224
    raw_pixels: bool = False  # store decoded RGB pixels (PPM) instead of JPEG: for tiny images
    reencode: bool = False  # re-encode every JPEG at ``quality``: smaller, faster to decode, lossy
    restart_markers: bool = False  # a restart marker after every MCU: crops decode only their MCUs

    def __post_init__(self):
        checks = {
            "shard_size": self.shard_size >= 1,
            "shard_bytes": self.shard_bytes is None or self.shard_bytes >= 1,
            "resize_shorter": self.resize_shorter is None or self.resize_shorter >= 1,
            "quality": 1 <= self.quality <= 100,
            "augment_copies": self.augment_copies >= 0,
            "augment_size": self.augment_size >= 8,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}: {getattr(self, name)!r}")
        for option in ("reencode", "restart_markers"):
            if getattr(self, option) and self.raw_pixels:
                raise ValueError(f"invalid {option}: raw-pixel shards (raw_pixels) hold no JPEG to apply it to")

    def to_json(self) -> dict:
        params = asdict(self)
        for option in ("raw_pixels", "reencode", "restart_markers"):  # preparations made before these existed still resume
            if not params[option]:
                del params[option]
        return params


@dataclass(frozen=True)
class Item:
    """One sample to write: the source, its class index, its position in the split, which copy."""

    ref: SampleRef
    label: int
    position: int
    copy: int = -1  # -1: the image itself; k >= 0: the k-th baked augmented copy


@dataclass
class ShardPlan:
    split: str
    index: int
    items: list[Item] = field(default_factory=list)
    group: int = 0  # training shards with baked copies: which copy of the images they hold

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


@dataclass
class Plan:
    params: PrepParams
    classes: list[dict]
    shards: list[ShardPlan]

    def summary(self) -> dict:
        """What is written to ``.plan.json``: enough for ``finalize`` and resumption checks."""
        return {
            "parameters": self.params.to_json(),
            "classes": self.classes,
            "shards": [self._shard_summary(s) for s in self.shards],
        }

    def _shard_summary(self, shard: ShardPlan) -> dict:
        entry = {"split": shard.split, "name": shard.name, "planned": len(shard.items)}
        # Copy groups exist only with baked copies; an unbaked plan reads as before (all group 0),
        # so that preparations made before groups existed can still be resumed.
        if self.params.augment_copies and shard.split == "train":
            entry["group"] = shard.group
        return entry


def _imagenet_names(class_ids: list[str]) -> dict[str, str] | None:
    """torchvision ships the 1,000 ILSVRC names in sorted-wnid order (its weights' meta)."""
    if len(class_ids) != 1000 or not all(sources.WNID_PATTERN.match(c) for c in class_ids):
        return None
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return dict(zip(sorted(class_ids), _IMAGENET_CATEGORIES))


def class_table(class_ids: list[str], params: PrepParams) -> list[dict]:
    names: dict[str, str] = {}
    if params.devkit:
        names = sources.read_devkit(Path(params.devkit))[0]
    elif params.class_names:
        names = sources.read_class_names(Path(params.class_names))
    else:
        names = _imagenet_names(class_ids) or {}
    return [{"index": i, "id": c, "name": names.get(c, c)} for i, c in enumerate(sorted(class_ids))]


def _cut(split: str, items: list[Item], params: PrepParams, first_index: int = 0, group: int = 0) -> list[ShardPlan]:
    """Consecutive runs of ``items``, each up to ``shard_size`` samples or ``shard_bytes`` of source."""
    limit = params.shard_bytes or params.shard_size
    shards: list[ShardPlan] = []
    filled = 0
    for item in items:
        cost = item.ref.source_size() if params.shard_bytes else 1
        if not shards or (shards[-1].items and filled + cost > limit):
            shards.append(ShardPlan(split, first_index + len(shards), group=group))
            filled = 0
        shards[-1].items.append(item)
        filled += cost
    return shards


def _train_shards(refs: list[SampleRef], index: dict[str, int], params: PrepParams) -> list[ShardPlan]:
    """The shuffled training shards: one group, or with baked copies one group per copy."""
    refs = sorted(refs, key=lambda r: r.name)  # a fixed order to shuffle, whatever the scan order
    if not params.augment_copies:
        random.Random(params.seed).shuffle(refs)
        return _cut("train", [Item(r, index[r.class_id], pos) for pos, r in enumerate(refs)], params)
    shards: list[ShardPlan] = []
    for k in range(params.augment_copies):
        order = list(refs)
        random.Random(f"{params.seed}/copy{k}").shuffle(order)  # its own shuffle: other neighbours per copy
        # Positions run on across the groups, so sample keys stay unique within the split.
        start = k * len(order)
        items = [Item(r, index[r.class_id], start + i, k) for i, r in enumerate(order)]
        shards += _cut("train", items, params, first_index=len(shards), group=k)
    return shards


def make_plan(params: PrepParams) -> Plan:
    train_refs = resolve.resolve_train(Path(params.train))
    val_refs = (
        resolve.resolve_val(Path(params.val), _opt(params.val_labels), _opt(params.devkit))
        if params.val
        else []
    )
    class_ids = sorted({r.class_id for r in train_refs})
    index = {c: i for i, c in enumerate(class_ids)}
    unknown = sorted({r.class_id for r in val_refs} - set(index))
    if unknown:
        raise SourceError(
            f"{params.val}: {len(unknown)} validation classes are not among the training classes "
            f"(first: {unknown[0]!r})"
        )
    val_items = [Item(r, index[r.class_id], pos) for pos, r in enumerate(val_refs)]  # keeps its order
    shards = _train_shards(train_refs, index, params) + _cut("val", val_items, params)
    return Plan(params, class_table(class_ids, params), shards)


def _opt(value: str | None) -> Path | None:
    return Path(value) if value else None

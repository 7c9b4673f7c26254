"""Decide, deterministically, which sample goes into which shard.

The plan depends only on the sources and the parameters, so every SLURM array task computes
the same plan on its own and writes its share of the shards, and a re-run after a kill knows
exactly which shards are still missing.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import sources
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

    def to_json(self) -> dict:
        return asdict(self)


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
            "shards": [{"split": s.split, "name": s.name, "planned": len(s.items)} for s in self.shards],
        }


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


def _cut(split: str, items: list[Item], params: PrepParams) -> list[ShardPlan]:
    """Consecutive runs of ``items``, each up to ``shard_size`` samples or ``shard_bytes`` of source."""
    limit = params.shard_bytes or params.shard_size
    shards: list[ShardPlan] = []
    filled = 0
    for item in items:
        cost = item.ref.source_size() if params.shard_bytes else 1
        if not shards or (shards[-1].items and filled + cost > limit):
            shards.append(ShardPlan(split, len(shards)))
            filled = 0
        shards[-1].items.append(item)
        filled += cost
    return shards


def make_plan(params: PrepParams) -> Plan:
    train_refs = sources.resolve_train(Path(params.train))
    val_refs = (
        sources.resolve_val(Path(params.val), _opt(params.val_labels), _opt(params.devkit))
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
    # ILSVRC's train archive is grouped by class: shuffle globally so every shard mixes classes.
    train_refs = sorted(train_refs, key=lambda r: r.name)
    copies = range(params.augment_copies) if params.augment_copies else [-1]
    train_items = [Item(r, index[r.class_id], 0, k) for r in train_refs for k in copies]
    random.Random(params.seed).shuffle(train_items)
    train_items = [Item(it.ref, it.label, pos, it.copy) for pos, it in enumerate(train_items)]
    val_items = [Item(r, index[r.class_id], pos) for pos, r in enumerate(val_refs)]  # keeps its order
    shards = _cut("train", train_items, params) + _cut("val", val_items, params)
    return Plan(params, class_table(class_ids, params), shards)


def _opt(value: str | None) -> Path | None:
    return Path(value) if value else None

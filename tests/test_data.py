"""The trainer's WebDataset input pipeline: rank/worker splitting, equal lengths, resume, exact eval."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from data_prep import augment
from data_prep.manifest import PrepError
from pipeline.data import EvalStream, TrainStream, make_loader, open_prepared


def train_stream(data, rank=0, world=1, batches=None, batch_size=4, seed=0):
    per_rank = batches or data.train_samples // (batch_size * world)
    return TrainStream(data.train, batch_size=batch_size, batches_per_epoch=per_rank, rank=rank, world_size=world,
                       seed=seed, image_size=32, crop=augment.CropSpec(), baked=False, shuffle_buffer=20,
                       eval_resize=36)


def batches_of(stream, workers):
    return [(x.clone(), y.clone()) for x, y in make_loader(stream, workers, pin_memory=False)]


def test_open_prepared_reports_missing_manifest_and_shards(tiny_data, tmp_path):
    with pytest.raises(PrepError, match=str(tmp_path)):
        open_prepared(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PrepError, match="train-000000.tar: shard listed in the manifest is missing"):
        open_prepared(copy)


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 1), (2, 0)])
def test_every_rank_gets_the_same_number_of_full_batches(tiny_data, world, workers):
    data = open_prepared(tiny_data)
    per_rank = data.train_samples // (4 * world)
    for rank in range(world):
        stream = train_stream(data, rank, world)
        stream.set_epoch(1)
        batches = batches_of(stream, workers)
        assert len(batches) == per_rank
        assert all(x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 for x, _ in batches)


def test_one_rank_epoch_covers_the_data_and_epochs_differ(tiny_data):
    data = open_prepared(tiny_data)
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    stream = train_stream(data, batches=data.train_samples // 4)
    stream.set_epoch(0)
    epoch0 = batches_of(stream, 2)
    labels = Counter(int(y) for _, ys in epoch0 for y in ys)
    assert labels == {int(k): v for k, v in manifest["splits"]["train"]["class_counts"].items()}
    stream.set_epoch(1)
    epoch1 = batches_of(stream, 2)
    assert [y.tolist() for _, y in epoch0] != [y.tolist() for _, y in epoch1]  # reshuffled
    stream.set_epoch(0)
    again = batches_of(stream, 2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, again))  # seeded: reproducible


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_epoch_yields_exactly_the_remaining_batches(tiny_data, workers):
    data = open_prepared(tiny_data)
    stream = train_stream(data, rank=1, world=2)
    stream.set_epoch(3)
    full = batches_of(stream, workers)
    stream.set_epoch(3, start_batch=5)
    tail = batches_of(stream, workers)
    assert len(tail) == len(full) - 5
    for (x, y), (xt, yt) in zip(full[5:], tail):
        assert torch.equal(x, xt) and torch.equal(y, yt)


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 2), (3, 2), (1, 2)])
def test_validation_counts_every_sample_exactly_once(tiny_data, world, workers):
    data = open_prepared(tiny_data)
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    assert [s.samples for s in data.val] == [5, 5, 5, 1]  # uneven on purpose
    seen = Counter()
    pixels = []
    for rank in range(world):
        stream = EvalStream(data.val, batch_size=3, rank=rank, world_size=world, image_size=32, resize=36)
        for x, y in make_loader(stream, workers, pin_memory=False):
            seen.update(int(v) for v in y)
            pixels.extend(x.reshape(len(x), -1).float().sum(1).tolist())
    assert sum(seen.values()) == data.val_samples == 16
    assert seen == {int(k): v for k, v in manifest["splits"]["val"]["class_counts"].items()}
    assert len(set(pixels)) == 16  # sixteen different images, none twice

"""The trainer's WebDataset input pipeline: rank/worker splitting, equal lengths, resume, exact eval."""
from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from imaging.crops import decode_center_crop
from imaging.specs import CropSpec
from pipeline.data.batches import make_loader
from pipeline.data.prepared import IGNORE_LABEL, Skipped, open_prepared, shard_range
from pipeline.data.webdataset_input import EvalStream, TrainStream
from shards.manifest import PrepError


def train_stream(data, rank=0, world=1, batches=None, batch_size=4, seed=0):
    per_rank = batches or data.train_samples // (batch_size * world)
    return TrainStream(data.train, batch_size=batch_size, batches_per_epoch=per_rank, rank=rank, world_size=world,
                       seed=seed, image_size=32, crop=CropSpec(), baked=False, shuffle_buffer=20,
                       eval_resize=36, num_classes=data.num_classes)


def batches_of(stream, workers):
    batches = [(x.clone(), y.clone(), skipped) for x, y, skipped in make_loader(stream, workers, pin_memory=False)]
    assert not any(skipped for _, _, skipped in batches)  # sound shards: nothing skipped
    return [(x, y) for x, y, _ in batches]


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
        stream = EvalStream(data.val, batch_size=3, rank=rank, world_size=world, image_size=32, resize=36,
                            num_classes=data.num_classes)
        for x, y, skipped in make_loader(stream, workers, pin_memory=False):
            assert not skipped
            seen.update(int(v) for v in y)
            pixels.extend(x.reshape(len(x), -1).float().sum(1).tolist())
    assert sum(seen.values()) == data.val_samples == 16
    assert seen == {int(k): v for k, v in manifest["splits"]["val"]["class_counts"].items()}
    assert len(set(pixels)) == 16  # sixteen different images, none twice


# ----------------------------------------------------------------------------- sample keys
# The tests below follow individual samples by key through TrainStream.lane_samples, which is
# what __iter__ decodes (test_loader_batches_are_the_decoded_lane_samples ties the two together).

def key_stream(data, rank=0, world=1, batch_size=5, seed=0, **kwargs):
    """A TrainStream whose epochs are read as keys; the defaults drop a remainder at every world size."""
    epoch_samples = data.train_samples // max(1, data.augment_copies)
    options = {"crop": None, "baked": data.augment_copies > 0, "shuffle_buffer": 20, **kwargs}
    return TrainStream(data.train, batch_size=batch_size, batches_per_epoch=epoch_samples // (batch_size * world),
                       rank=rank, world_size=world, seed=seed, image_size=32, eval_resize=36,
                       num_classes=data.num_classes, **options)


def lane_keys(stream, lane, lanes) -> list[str]:
    return [sample.key for sample in stream.lane_samples(lane, lanes)]


def shard_keys(url: str) -> list[str]:
    """A shard's sample keys in file order, read with tarfile (independently of pipeline.data)."""
    with tarfile.open(url) as tar:
        return list(dict.fromkeys(name.split(".", 1)[0] for name in tar.getnames()))


def epoch_sequence(stream) -> list[str]:
    """The keys of the stream's current epoch in shard-sequence order (before any slot cuts it)."""
    return [key for shard in stream.epoch_shards() for key in shard_keys(shard.url)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_slots_partition_the_epoch_exactly(tiny_data, world, lanes):
    data = open_prepared(tiny_data)
    batch = 5
    used = world * (96 // (batch * world)) * batch  # 95, 90, 90: the remainder is dropped
    assert 0 < 96 - used < world * batch
    slots = []
    for rank in range(world):
        stream = key_stream(data, rank, world, batch)
        stream.set_epoch(2)
        for lane in range(lanes):
            keys = lane_keys(stream, lane, lanes)
            assert len(keys) == len(range(lane, stream.batches_per_epoch, lanes)) * batch
            slots.append(keys)
    read = [key for keys in slots for key in keys]
    assert len(read) == len(set(read)) == used  # no key in two slots, none twice in one
    sequence = epoch_sequence(stream)
    all_keys = {key for shard in data.train for key in shard_keys(shard.url)}
    assert len(sequence) == 96 and set(sequence) == all_keys
    assert set(read) == set(sequence[:used])  # everything but the tail of the epoch's sequence


def test_epochs_differ_in_order_and_repeat_exactly(tiny_data):
    data = open_prepared(tiny_data)

    def epoch(e):
        keys = []
        for rank in range(2):
            stream = key_stream(data, rank, 2, batch_size=4)
            stream.set_epoch(e)
            keys += [lane_keys(stream, lane, 2) for lane in range(2)]
        return keys

    first, second = epoch(0), epoch(1)
    assert epoch(0) == first  # new streams, same (seed, epoch): the same keys in the same order
    assert {k for lane in first for k in lane} == {k for lane in second for k in lane}  # 96 = 2 x 12 x 4: all
    assert all(a != b for a, b in zip(first, second))  # every slot's order differs
    assert set(first[0]) != set(second[0])  # and so does which samples a slot gets


def window_recurrence(data, interleave_shards: int, window: int = 2) -> float:
    """Of each sample's neighbours (the keys within ``window`` places in its lane's order), the
    fraction that are its neighbours again in the next epoch, averaged over four epoch pairs."""
    stream = key_stream(data, batch_size=4, shuffle_buffer=2, interleave_shards=interleave_shards)

    def neighbours(epoch):
        stream.set_epoch(epoch)
        found = {}
        for lane in range(2):
            keys = lane_keys(stream, lane, 2)
            for i, key in enumerate(keys):
                found[key] = set(keys[max(0, i - window):i] + keys[i + 1:i + 1 + window])
        return found

    epochs = [neighbours(e) for e in range(5)]
    kept = sum(len(a[k] & b[k]) for a, b in zip(epochs, epochs[1:]) for k in a)
    return kept / sum(len(a[k]) for a in epochs[:-1] for k in a)


def test_interleaving_changes_each_samples_neighbours_between_epochs(tiny_data):
    data = open_prepared(tiny_data)
    # One shard at a time through a small buffer: a sample meets mostly its shard-mates (shards
    # of 5 here), whatever the epoch, which is what interleaving is for.
    one, four = window_recurrence(data, interleave_shards=1), window_recurrence(data, interleave_shards=4)
    print(f"neighbours recurring in the next epoch: interleave_shards=1 {one:.2f}, 4 {four:.2f}")
    assert one > 0.3 and four < 0.2


def test_loader_batches_are_the_decoded_lane_samples(tiny_data):
    """The real DataLoader with 2 workers yields, batch after batch, lane (batch index mod 2)'s
    samples decoded, so the key-level tests above speak for what the trainer gets."""
    data = open_prepared(tiny_data)
    stream = key_stream(data, rank=1, world=2, batch_size=4)
    stream.set_epoch(5)
    loaded = batches_of(stream, 2)
    lanes = [list(stream.lane_samples(lane, 2)) for lane in range(2)]
    expected = []
    for index in range(stream.batches_per_epoch):
        samples = lanes[index % 2][index // 2 * 4:][:4]
        expected.append((torch.stack([decode_center_crop(s.data, 32, 36) for s in samples]),
                         torch.tensor([s.label for s in samples])))
    assert len(loaded) == len(expected) == 12
    for (x, y), (xe, ye) in zip(loaded, expected):
        assert torch.equal(x, xe) and torch.equal(y, ye)


# ----------------------------------------------------------------------------- baked copies

def source_and_copy(key: str) -> tuple[str, int]:
    """``00000042_n01440764_3_copy1`` -> (the source image's part, 1); positions differ per copy."""
    stem, copy = key.rsplit("_copy", 1)
    return stem.split("_", 1)[1], int(copy)


def test_baked_groups_are_consecutive_equal_and_checked(baked_data, tmp_path):
    data = open_prepared(baked_data)
    assert data.augment_copies == 3 and data.train_samples == 96
    groups = [s.group for s in data.train]
    assert groups == sorted(groups) and set(groups) == {0, 1, 2}  # consecutive runs of shards
    for group in range(3):
        keys = [k for s in data.train if s.group == group for k in shard_keys(s.url)]
        sources = [source_and_copy(k)[0] for k in keys]
        assert len(sources) == len(set(sources)) == 32  # every good source once, the corrupt one in none
        assert {source_and_copy(k)[1] for k in keys} == {group}

    copy = tmp_path / "copy"
    shutil.copytree(baked_data, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["group"] = 1  # group 0 one shard short, group 1 one long
    (copy / "manifest.json").write_text(json.dumps(manifest))
    expected = f"{copy / 'manifest.json'}: training shards should form copy groups"
    with pytest.raises(PrepError, match=re.escape(expected)):
        open_prepared(copy)
    for shard in manifest["splits"]["train"]["shards"]:
        del shard["group"]  # as written before copy groups: all would be read in every epoch
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PrepError, match="copy groups"):
        open_prepared(copy)


@pytest.mark.parametrize("world,batch", [(1, 4), (2, 4), (1, 5), (2, 5)])
def test_baked_epoch_sees_every_source_image_once_from_one_copy(baked_data, world, batch):
    data = open_prepared(baked_data)
    used = world * (32 // (batch * world)) * batch  # 32, 32, 30, 30
    streams = [key_stream(data, rank, world, batch, interleave_shards=3) for rank in range(world)]
    seen: dict[str, dict[int, int]] = {}  # source image -> {epoch: copy read}
    for epoch in range(6):
        read = []
        for stream in streams:
            stream.set_epoch(epoch)
            read += [key for lane in range(2) for key in lane_keys(stream, lane, 2)]
        sources = [source_and_copy(k)[0] for k in read]
        assert len(sources) == len(set(sources)) == used  # each source at most once, all but the remainder
        assert {source_and_copy(k)[1] for k in read} == {epoch % 3}
        assert set(read) == set(epoch_sequence(streams[0])[:used])
        for key in read:
            source, copy = source_and_copy(key)
            seen.setdefault(source, {})[epoch] = copy
    assert len(seen) == 32
    for start in range(4):  # any 3 consecutive epochs: 3 different copies (fewer if dropped in one)
        for by_epoch in seen.values():
            copies = [by_epoch[e] for e in range(start, start + 3) if e in by_epoch]
            assert len(copies) == len(set(copies)) and (used < 32 or len(copies) == 3)


def test_baked_epoch_longer_than_a_copy_group_is_refused(baked_data):
    data = open_prepared(baked_data)
    stream = TrainStream(data.train, batch_size=4, batches_per_epoch=data.train_samples // 4, rank=0, world_size=1,
                         seed=0, image_size=32, crop=None, baked=True, shuffle_buffer=0, eval_resize=32,
                         num_classes=data.num_classes)
    with pytest.raises(ValueError, match="exceed the epoch's 32 training samples"):
        next(stream.lane_samples(0, 1))


def test_baked_epoch_through_the_loader(baked_data):
    data = open_prepared(baked_data)
    stream = key_stream(data, batch_size=4)
    stream.set_epoch(4)
    batches = batches_of(stream, 2)
    assert len(batches) == 8 and all(x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8 for x, _ in batches)
    labels = [sample.label for lane in range(2) for sample in stream.lane_samples(lane, 2)]
    assert sorted(int(v) for _, y in batches for v in y) == sorted(labels)


# ----------------------------------------------------------------------------- damaged shards
def damaged_copy(tiny_data, tmp_path, shard_name: str, damage) -> Path:
    """The prepared data, with one shard damaged after preparation by ``damage(bytes) -> bytes``."""
    copy = tmp_path / "damaged"
    shutil.copytree(tiny_data, copy)
    path = copy / shard_name
    path.write_bytes(damage(path.read_bytes()))
    return copy


def zero_middle(data: bytes) -> bytes:
    """A zeroed run of blocks from 40% to 60% of the file, as a failing disk or a bad copy leaves it."""
    start, stop = len(data) * 2 // 5 // 512 * 512, len(data) * 3 // 5
    return data[:start] + bytes(stop - start) + data[stop:]


def test_a_damaged_shard_yields_every_position_once_as_a_sample_or_a_record(tiny_data, tmp_path):
    data = open_prepared(damaged_copy(tiny_data, tmp_path, "train-000003.tar", zero_middle))
    shard = data.train[3]
    items = list(shard_range(shard, 0, shard.samples, data.num_classes))
    assert [item.index for item in items] == list(range(shard.samples))  # each position once, in order
    skipped = [item for item in items if isinstance(item, Skipped)]
    assert 0 < len(skipped) < shard.samples  # the samples before the damage are read
    assert all(item.shard == shard.url for item in skipped)
    assert all(any(words in item.reason for words in ("damaged shard", "tar breaks", "ends after"))
               for item in skipped), skipped
    # A range starting inside the damage (the zeroed blocks reach into the last sample): the
    # shard's index locates it, and it is recorded on its own (tests/test_fast_loader.py checks
    # that samples after a damaged one are read)
    tail = list(shard_range(shard, shard.samples - 1, shard.samples, data.num_classes))
    assert len(tail) == 1 and isinstance(tail[0], Skipped) and tail[0].index == shard.samples - 1


def test_training_batches_keep_their_shape_and_account_for_every_sample(tiny_data, tmp_path):
    data = open_prepared(damaged_copy(tiny_data, tmp_path, "train-000003.tar", zero_middle))
    stream = train_stream(data, batches=data.train_samples // 4)
    stream.set_epoch(0)
    batches = list(make_loader(stream, 2, pin_memory=False))
    assert len(batches) == data.train_samples // 4 and all(x.shape == (4, 3, 32, 32) for x, _, _ in batches)
    records = [r for _, _, skipped in batches for r in skipped]
    labelled = sum(int(y.ne(IGNORE_LABEL).sum()) for _, y, _ in batches)
    assert records and labelled + len(records) == len(batches) * 4
    assert sum(int(y.eq(IGNORE_LABEL).sum()) for _, y, _ in batches) == len(records)
    assert {r["shard"] for r in records} == {str(data.directory / "train-000003.tar")}
    assert len({(r["shard"], r["index"]) for r in records}) == len(records)  # none twice


def test_an_image_that_does_not_decode_is_recorded_by_key(tiny_data, tmp_path):
    def spoil_first_jpeg(raw: bytes) -> bytes:  # the tar stays intact; one image's bytes are garbage
        start = raw.index(b"\xff\xd8\xff")
        return raw[:start + 200] + bytes(range(256)) * 4 + raw[start + 200 + 1024:]

    data = open_prepared(damaged_copy(tiny_data, tmp_path, "val-000000.tar", spoil_first_jpeg))
    stream = EvalStream(data.val, batch_size=3, rank=0, world_size=1, image_size=32, resize=36,
                        num_classes=data.num_classes)
    batches = list(make_loader(stream, 0, pin_memory=False))
    records = [r for _, _, skipped in batches for r in skipped]
    with tarfile.open(data.val[0].url) as tar:
        first_key = tar.getnames()[0].split(".")[0]
    assert [(r["key"], r["index"], r["split"]) for r in records] == [(first_key, 0, "val")]
    assert "does not decode" in records[0]["reason"]
    assert sum(len(y) for _, y, _ in batches) == data.val_samples - 1


def test_an_image_over_the_loaders_pixel_limit_is_recorded_not_raised(tiny_data, tmp_path):
    """Shards prepared by an older version may hold an image a default Pillow refuses as a
    decompression bomb (15000 x 15000): the loader records it and goes on."""
    def with_a_huge_first_image(raw: bytes) -> bytes:
        huge = io.BytesIO()
        Image.new("L", (15000, 15000), 128).save(huge, format="JPEG")
        out = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(raw)) as src, tarfile.open(fileobj=out, mode="w") as dst:
            for i, member in enumerate(src.getmembers()):
                payload = huge.getvalue() if i == 0 else src.extractfile(member).read()
                member.size = len(payload)
                dst.addfile(member, io.BytesIO(payload))
        return out.getvalue()

    data = open_prepared(damaged_copy(tiny_data, tmp_path, "val-000000.tar", with_a_huge_first_image))
    stream = EvalStream(data.val, batch_size=3, rank=0, world_size=1, image_size=32, resize=36,
                        num_classes=data.num_classes)
    records = [r for _, _, skipped in make_loader(stream, 0, pin_memory=False) for r in skipped]
    assert len(records) == 1 and records[0]["index"] == 0 and "DecompressionBombError" in records[0]["reason"]

"""The DALI loader (data.loader=dali) on DALI's CPU operators: the shard loader's samples, crops
and resume, exact validation, damaged samples skipped and recorded (also those only DALI fails
on), the crop distribution, the rendered crops, two training processes resumed to the same
weights, and one line naming the extra where DALI is not installed."""
from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, subprocess_env
from PIL import Image
from test_augment import CROP_ALPHA, CROP_DRAWS, CROP_FEATURES, CROP_IMAGES, crop_features, same_distribution_p
from test_faults import zero_middle

from imaging.crops import sample_crop
from imaging.specs import INTERPOLATIONS, CropSpec
from pipeline.config import ConfigError
from pipeline.data.batches import make_loader
from pipeline.data.dali_input import (
    DaliDecoder,
    DaliInput,
    EncodedBatch,
    EncodedTrainStream,
    encoded_batches,
    require_dali,
)
from pipeline.data.prepared import IGNORE_LABEL, open_prepared
from pipeline.data.webdataset_input import EvalStream, TrainStream

pytest.importorskip("nvidia.dali")

BILINEAR = CropSpec(interpolations=("bilinear",))


def train_stream(shards: Path, rank: int = 0, world: int = 1, batch_size: int = 8, crop: CropSpec = BILINEAR,
                 image_size: int = 32) -> TrainStream:
    data = open_prepared(shards)
    return TrainStream(data.train, batch_size=batch_size, batches_per_epoch=data.train_samples // (world * batch_size),
                       rank=rank, world_size=world, seed=5, image_size=image_size, crop=crop, baked=False,
                       shuffle_buffer=8, eval_resize=36, num_classes=data.num_classes)


def dali_input(shards: Path, workers: int = 0, **kwargs) -> DaliInput:
    stream = train_stream(shards, **kwargs)
    return DaliInput(stream, open_prepared(shards).val, eval_batch_size=5, eval_resize=36, workers=workers,
                     device="cpu")


def mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.int() - b.int()).abs().float().mean().item()


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_the_shard_loaders_samples_and_crops_per_rank_and_an_exact_resume(tiny_data, workers):
    """For the same worker count, every batch of each rank holds the shard loader's samples, in
    its order, cropped from the same boxes (bilinear: within a fraction of a level); a pass
    resumed at batch 3 gives the same batches as the uninterrupted one."""
    for rank in range(2):
        dali = dali_input(tiny_data, workers, rank=rank, world=2)
        batches = list(dali.train_batches(epoch=1))
        reference_stream = train_stream(tiny_data, rank=rank, world=2)
        reference_stream.set_epoch(1)
        reference = list(make_loader(reference_stream, workers, pin_memory=False))
        assert len(batches) == len(reference) == 6  # 96 samples / (2 ranks x 8)
        for (images, labels, skipped), (expected, expected_labels, _) in zip(batches, reference):
            assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and not skipped
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(labels, expected_labels)
            assert mean_abs(images, expected) < 1.0
        resumed = list(dali.train_batches(epoch=1, start_batch=3))
        assert len(resumed) == 3
        for (a, la, _), (b, lb, _) in zip(batches[3:], resumed):
            assert torch.equal(a, b) and torch.equal(la, lb)
        again = list(dali.train_batches(epoch=1))  # after a pass left unfinished
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_validation_covers_every_sample_once_across_ranks(tiny_data):
    seen, expected = [], []
    for rank, workers in ((0, 0), (1, 2)):  # the slots of loader workers too
        dali = dali_input(tiny_data, workers, rank=rank, world=2)
        reference = EvalStream(open_prepared(tiny_data).val, batch_size=5, rank=rank, world_size=2, image_size=32,
                               resize=36, num_classes=4)
        ours = list(dali.val_batches())
        theirs = list(make_loader(reference, workers, pin_memory=False))
        assert [len(labels) for _, labels, _ in ours] == [len(labels) for _, labels, _ in theirs]
        images, labels = torch.cat([b[0] for b in ours]), torch.cat([b[1] for b in ours])
        reference_images, reference_labels = torch.cat([b[0] for b in theirs]), torch.cat([b[1] for b in theirs])
        assert torch.equal(labels, reference_labels) and mean_abs(images, reference_images) < 1.0
        seen.append(labels)
        expected.append(reference_labels)
    assert sum(len(s) for s in seen) == open_prepared(tiny_data).val_samples == 16


def spoil_for_dali(shard: Path, position: int = 0) -> str:
    """Sample ``position``'s JPEG cut off 40 bytes into its scan and filled up with 0xFF to its
    stored length: its header still parses (so only the decoder can tell), Pillow and DALI
    both fail on it. Returns its key."""
    with tarfile.open(shard) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][position]
    data = bytearray(shard.read_bytes())
    start, stop = member.offset_data, member.offset_data + member.size
    jpeg = bytes(data[start:stop])
    cut = jpeg.index(b"\xff\xda") + 40
    data[start:stop] = jpeg[:cut] + b"\xff" * (len(jpeg) - cut)
    shard.write_bytes(bytes(data))
    return member.name.rsplit(".", 1)[0]


def test_damaged_samples_and_images_dali_cannot_decode_are_skipped_and_recorded(tiny_data, tmp_path):
    """A shard zeroed in its middle, and a JPEG only a decoder can tell is broken: every
    position of the epoch is trained on or recorded (once), batches stay full, and the JPEG's
    record names its shard and key and DALI's reason."""
    copy = tmp_path / "shards"
    shutil.copytree(tiny_data, copy)
    zero_middle(copy / "train-000003.tar")
    key = spoil_for_dali(copy / "train-000007.tar")
    dali = dali_input(copy, batch_size=8)
    labelled, records = 0, []
    for images, labels, skipped in dali.train_batches(epoch=0):
        assert images.shape == (8, 3, 32, 32)
        assert int((labels == IGNORE_LABEL).sum()) == len(skipped)  # a skipped sample keeps its slot
        labelled += int((labels != IGNORE_LABEL).sum())
        records += skipped
    assert labelled + len(records) == 96
    assert {r["shard"] for r in records} == {str(copy / "train-000003.tar"), str(copy / "train-000007.tar")}
    assert len({(r["shard"], r["index"]) for r in records}) == len(records)
    (dali_record,) = [r for r in records if r["shard"].endswith("train-000007.tar")]
    assert dali_record["key"] == key and dali_record["index"] == 0 and dali_record["split"] == "train"
    assert dali_record["reason"].startswith("does not decode (DALI: ")
    # The same image in validation is left out and recorded; the other samples are all there.
    spoil_for_dali(copy / "val-000001.tar")
    batches = list(dali.val_batches())
    assert sum(len(labels) for _, labels, _ in batches) == 15
    (record,) = [r for _, _, skipped in batches for r in skipped]
    assert record["split"] == "val" and record["reason"].startswith("does not decode (DALI: ")


def test_a_batch_whose_only_readable_image_dali_cannot_decode_keeps_its_slots_and_records_it_once():
    """The slots of unreadable samples hold copies of the batch's one readable image, which DALI
    then fails on: every slot becomes a placeholder without a label, and that image is recorded
    once (its copies were recorded as what they stood for)."""
    noise = io.BytesIO()
    Image.effect_noise((48, 40), 60).convert("RGB").save(noise, "JPEG")
    jpeg = noise.getvalue()
    cut = jpeg.index(b"\xff\xda") + 40
    spoiled = jpeg[:cut] + b"\xff" * (len(jpeg) - cut)
    stream = EncodedTrainStream(TrainStream([], batch_size=4, batches_per_epoch=1, rank=0, world_size=1, seed=0,
                                            image_size=16, crop=BILINEAR, baked=False, shuffle_buffer=0,
                                            eval_resize=16, num_classes=2))
    planned = stream.geometry(spoiled, 48, 40, seed=0)._replace(source=("shard.tar", 2, "bad"))
    earlier = [{"split": "train", "shard": "shard.tar", "index": i, "key": None, "reason": "lost"} for i in (0, 1, 3)]
    entries = iter([(None, earlier[0]), (None, earlier[1]), (planned, 1), (None, earlier[2])])
    (batch,) = encoded_batches(entries, 4, keep_slots=True)
    assert batch.labels.tolist() == [IGNORE_LABEL, IGNORE_LABEL, 1, IGNORE_LABEL]
    decoder = DaliDecoder(4, 16, torch.device("cpu"), threads=1, hw_decoder_load=0)
    ((checked, images),) = decoder.decode([batch], keep_slots=True)
    assert checked.labels.tolist() == [IGNORE_LABEL] * 4 and images.shape == (4, 16, 16, 3)
    assert [r["index"] for r in checked.skipped] == [0, 1, 3, 2]
    assert checked.skipped[-1]["key"] == "bad" and checked.skipped[-1]["reason"].startswith("does not decode (DALI: ")


def test_crop_boxes_are_the_shard_loaders_and_follow_torchvisions_random_resized_crop():
    """The boxes the loader plans are those of the shard loader's sampler for the same seed
    (test_augment checks that sampler with 20,000 draws); and, against torchvision's
    RandomResizedCrop.get_params with test_augment's chi-square test, on fewer draws."""
    from torchvision.transforms import RandomResizedCrop

    draws = CROP_DRAWS // 4
    torch.manual_seed(0)
    stream = EncodedTrainStream(TrainStream([], batch_size=1, batches_per_epoch=1, rank=0, world_size=1, seed=0,
                                            image_size=224, crop=CropSpec(), baked=False, shuffle_buffer=0,
                                            eval_resize=256, num_classes=1))
    for width, height in CROP_IMAGES:
        plans = [stream.geometry(b"", width, height, seed) for seed in range(draws)]
        drawn = [sample_crop(width, height, CropSpec(), random.Random(seed)) for seed in range(draws)]
        assert [p.region for p in plans] == [(c.left, c.top, c.width, c.height) for c in drawn]
        assert [p.roi[1] > p.roi[3] for p in plans] == [c.flip for c in drawn]
        assert [INTERPOLATIONS[p.interpolation] for p in plans] == [c.interpolation for c in drawn]
        ours = crop_features([(y, x, h, w) for x, y, w, h in (p.region for p in plans)], width, height)
        image = torch.empty(1, height, width)
        theirs = crop_features([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                                for _ in range(draws)], width, height)
        p = {f: same_distribution_p(ours[f], theirs[f]) for f in CROP_FEATURES}
        assert min(p.values()) > CROP_ALPHA, (width, height, p)


def coordinate_map(width: int, height: int) -> bytes:
    """Raw pixels (PPM) whose red is the column and green the row."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PPM")
    return out.getvalue()


@pytest.mark.parametrize("region", [True, False], ids=["region", "whole_image"])
def test_dali_renders_the_planned_crops(region):
    """Crops of coordinate maps, decoded by DALI (nearest): each output spans the planned box,
    mirrored where planned, decoding the region or the whole image."""
    size, width, height = 48, 200, 150
    stream = EncodedTrainStream(TrainStream([], batch_size=1, batches_per_epoch=1, rank=0, world_size=1, seed=0,
                                            image_size=size, crop=CropSpec(interpolations=("nearest",)), baked=False,
                                            shuffle_buffer=0, eval_resize=size, num_classes=1))
    data = coordinate_map(width, height)
    plans = [stream.geometry(data, width, height, seed) for seed in range(32)]
    decoder = DaliDecoder(16, size, torch.device("cpu"), threads=1, hw_decoder_load=0, region=region)
    batches = [EncodedBatch.of([(p, 0) for p in plans[i:i + 16]], ()) for i in (0, 16)]
    outputs = [images for _, images in decoder.decode(batches, keep_slots=True)]
    for plan, image in zip(plans, torch.cat(outputs)):
        x, y, w, h = plan.region
        columns, rows = image[0, :, 0].int(), image[:, 0, 1].int()  # red along the top row, green down the left
        mirrored = plan.roi[1] > plan.roi[3]
        if mirrored:
            columns = columns.flip(0)
        slack = max(w, h) / (2 * size) + 1  # nearest samples each output pixel's centre
        assert abs(columns[0] - x) <= slack and abs(columns[-1] - (x + w - 1)) <= slack, (plan, columns)
        assert abs(rows[0] - y) <= slack and abs(rows[-1] - (y + h - 1)) <= slack, (plan, rows)
        assert bool((columns.diff() >= 0).all()), "mirrored where the plan is not, or the other way round"


def test_without_dali_one_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if it were not installed
    with pytest.raises(ConfigError) as error:
        require_dali()
    assert str(error.value) == ("data.loader: dali needs NVIDIA DALI (the Python package nvidia-dali), which is not "
                                "installed: pip install -e '.[dali]' (or bash scripts/setup.sh --dali)")


@pytest.mark.slow
def test_the_trainer_without_dali_stops_with_one_line_before_anything_starts(tiny_data, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['nvidia.dali'] = None  # as if not installed\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{shim}{os.pathsep}{env['PYTHONPATH']}"
    from test_train import TINY

    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "data.loader=dali", f"data.dir={tiny_data}",
                             f"output_dir={tmp_path}", "name=missing", "train.max_steps=1"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: data.loader: dali needs NVIDIA DALI (the Python package nvidia-dali), which is not "
                      "installed: pip install -e '.[dali]' (or bash scripts/setup.sh --dali)"], result.stderr[-3000:]
    assert not (tmp_path / "missing").exists()  # nothing started


@pytest.mark.slow
def test_two_processes_train_with_dali_and_resume_mid_epoch_to_the_same_weights(tiny_data, tmp_path):
    """2 processes (gloo), 6 updates of 2 x 8 images: validation counts every sample once, and a
    run stopped after 3 updates (mid-epoch) and resumed ends with the uninterrupted run's weights."""
    from test_train import EXACT, TINY, final_weights, launch, launch_command, metrics

    args = [*TINY, *EXACT, "data.loader=dali", "data.batch_size=8", "data.workers=1", f"data.dir={tiny_data}",
            f"output_dir={tmp_path}", "schedule.epochs=1"]
    # The uninterrupted run and the one stopped after 3 updates at once: they mostly start up.
    logs = {name: tmp_path / f"{name}.stderr" for name in ("straight", "resumed")}
    runs = {}
    try:
        for name, extra in (("straight", []), ("resumed", ["train.max_steps=3"])):
            with open(logs[name], "w") as log:  # a file, not a pipe: no child waits on a full pipe
                runs[name] = subprocess.Popen(launch_command(2, *args, f"name={name}", *extra), cwd=tmp_path,
                                              env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=log)
        for name, process in runs.items():
            assert process.wait(timeout=300) == 0, f"{name}:\n{logs[name].read_text()[-4000:]}"
    finally:  # after a failure, no run is left training into the next test
        for process in runs.values():
            process.kill()
            process.wait()
    assert "data.loader=dali: decoding each crop region on DALI's CPU operators" in logs["straight"].read_text()
    records = metrics(tmp_path / "straight")
    assert [(r["train_samples"], r["val_samples"]) for r in records] == [(96, 16)]
    resumed = launch(2, *args, "name=resumed", cwd=tmp_path)
    assert "resumed from" in resumed.stderr and "(step 3)" in resumed.stderr
    weights, resumed_weights = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert weights.keys() == resumed_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], resumed_weights[name]), name

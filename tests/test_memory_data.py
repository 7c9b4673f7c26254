"""The in-memory loader on real shards (prepared from a small CIFAR-10-format archive): equal
batches per rank, every validation sample once, exact resume, the crops' distribution."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_archives import cifar10_archive

from data_prep.plan import PrepParams
from data_prep.writer import run
from imaging.specs import CropSpec
from pipeline.config import ConfigError, load_config
from pipeline.data.memory_input import MemoryInput, decode_split, resample, sample_boxes
from pipeline.data.prepared import BadSampleError, open_prepared

CROP = CropSpec(area=(0.25, 1.0), ratio=(3 / 4, 4 / 3), flip=True)


@pytest.fixture(scope="module")
def cifar_shards(tmp_path_factory) -> Path:
    """85 training and 17 test images of 32x32, in uneven shards of 7."""
    root = tmp_path_factory.mktemp("memory")
    archive = root / "cifar-10-binary.tar.gz"
    cifar10_archive(archive, per_batch=17)  # 5 x 17 training images... and 17 test images
    run(PrepParams(train=str(archive), val=str(archive), shard_size=7, quality=95), root / "shards")
    return root / "shards"


def memory_input(shards: Path, rank: int = 0, world: int = 1, crop=CROP, batch_size: int = 8, **kwargs) -> MemoryInput:
    data = open_prepared(shards)
    options = dict(batch_size=batch_size, eval_batch_size=5, rank=rank, world_size=world, seed=3,
                   image_size=48, eval_resize=48, crop=crop, device="cpu",
                   batches_per_epoch=data.train_samples // (world * batch_size))
    return MemoryInput(data, **{**options, **kwargs})


def fingerprints(images: torch.Tensor) -> list[bytes]:
    return [image.numpy().tobytes() for image in images]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_gets_the_same_number_of_full_batches_of_distinct_samples(cifar_shards, world):
    # Without a crop, a training image is the evaluation transform of its stored image: then the
    # batches can be traced back to the samples they hold.
    inputs = [memory_input(cifar_shards, r, world, crop=None, image_size=32, eval_resize=32) for r in range(world)]
    stored = {f: i for i, f in enumerate(fingerprints(inputs[0].train_images))}
    assert len(stored) == 85  # every stored image differs
    seen = []
    for source in inputs:
        batches = list(source.train_batches(epoch=1))
        assert len(batches) == 85 // (world * 8) == source.batches_per_epoch
        for images, labels, skipped in batches:
            assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and skipped == ()
            assert labels.dtype == torch.int64
            for f, label in zip(fingerprints(images), labels.tolist()):
                seen.append(stored[f])
                assert source.train_labels[stored[f]] == label
    assert len(seen) == len(set(seen)) == world * source.batches_per_epoch * 8


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_covers_every_sample_once_across_ranks(cifar_shards, world):
    data = open_prepared(cifar_shards)
    expected_images, expected_labels = decode_split(data.val, 0, "val", data.num_classes)
    seen_images, seen_labels = [], []
    for rank in range(world):
        for images, labels, skipped in memory_input(cifar_shards, rank, world, image_size=32, eval_resize=32).val_batches():
            assert skipped == () and len(images) <= 5
            seen_images.append(images)
            seen_labels.append(labels)
    # Ranks take contiguous ranges in order: together, the split as stored, each sample once
    assert torch.equal(torch.cat(seen_images), expected_images)  # 32 px at 32 px: the pixels themselves
    assert torch.equal(torch.cat(seen_labels), expected_labels)
    assert len(expected_labels) == data.val_samples == 17


def test_resume_at_a_batch_gives_the_same_batches(cifar_shards):
    source = memory_input(cifar_shards, rank=1, world=2)
    full = list(source.train_batches(epoch=2))
    resumed = list(memory_input(cifar_shards, rank=1, world=2).train_batches(epoch=2, start_batch=3))
    assert len(resumed) == len(full) - 3
    for (a, la, _), (b, lb, _) in zip(full[3:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)
    other_epoch = list(source.train_batches(epoch=3))
    assert not torch.equal(full[0][0], other_epoch[0][0])
    other_rank = list(memory_input(cifar_shards, rank=0, world=2).train_batches(epoch=2))
    assert not torch.equal(full[0][0], other_rank[0][0])


def test_crop_boxes_follow_torchvisions_random_resized_crop():
    n, width, height = 20000, 32, 24
    boxes, flips = sample_boxes(n, width, height, CROP, torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    assert (w >= 1).all() and (h >= 1).all() and torch.equal(boxes, boxes.round())  # whole pixels, as torchvision
    assert abs(flips.float().mean().item() - 0.5) < 0.02
    # The same statistics from torchvision's own sampler
    torch.manual_seed(0)
    reference = torch.tensor([torchvision.transforms.RandomResizedCrop.get_params(
        torch.zeros(1, height, width), list(CROP.area), list(CROP.ratio)) for _ in range(n)], dtype=torch.float64)
    ref_h, ref_w = reference[:, 2], reference[:, 3]
    ours = {"area": (w * h / (width * height)).double(), "aspect": (w / h).double(), "left": boxes[:, 0].double(),
            "top": boxes[:, 1].double()}
    theirs = {"area": ref_h * ref_w / (width * height), "aspect": ref_w / ref_h, "left": reference[:, 1],
              "top": reference[:, 0]}
    for name in ours:
        a, b = ours[name], theirs[name]
        assert abs(a.mean() - b.mean()) < 4 * math.hypot(a.std(), b.std()) / math.sqrt(n), name
        assert abs(a.std() - b.std()) < 0.05 * b.std(), name


def test_resampling_crops_flips_and_upscales_like_plain_interpolation():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 12, 16), dtype=torch.uint8)
    whole = torch.tensor([[0.0, 0.0, 16.0, 12.0]]).expand(3, 4)
    # Same size, no flip: the pixels themselves; with a flip, mirrored
    assert torch.equal(resample(images[:, :, :, 2:14], torch.tensor([[0.0, 0.0, 12.0, 12.0]]).expand(3, 4), 12),
                       images[:, :, :, 2:14])
    flips = torch.tensor([True, False, True])
    flipped = resample(images[:, :, :, :12], torch.tensor([[0.0, 0.0, 12.0, 12.0]]).expand(3, 4), 12, flips)
    assert torch.equal(flipped[0], images[0, :, :, :12].flip(-1)) and torch.equal(flipped[1], images[1, :, :, :12])
    # A box upscaled: bilinear, as F.interpolate (align_corners=False) computes it
    box = torch.tensor([[4.0, 2.0, 12.0, 10.0]]).expand(3, 4)  # 8x8 -> 24x24
    expected = F.interpolate(images[:, :, 2:10, 4:12].float(), size=24, mode="bilinear", align_corners=False)
    got = resample(images, box, 24).float()
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # the borders see the pixels beyond the box
    assert (got[inner] - expected[inner].round()).abs().max() <= 1
    assert resample(images, whole, 8).shape == (3, 3, 8, 8)


def test_training_crops_cover_the_images_in_the_configured_share(cifar_shards):
    """Crops of a marked image, rendered by the loader: the share of the image each covers."""
    source = memory_input(cifar_shards, crop=CropSpec(area=(0.25, 1.0), flip=False), image_size=32)
    # Replace the stored images by coordinate maps: red = 8 x column, green = 8 x row
    ys, xs = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    marked = torch.stack([xs * 8, ys * 8, torch.zeros_like(xs)]).to(torch.uint8)
    source.train_images = marked.expand_as(source.train_images).clone()
    shares = []
    for images, _, _ in source.train_batches(epoch=0):
        for image in images.float():
            width = (image[0, :, -1] - image[0, :, 0]).mean() / 8 * 32 / 31  # columns spanned
            height = (image[1, -1, :] - image[1, 0, :]).mean() / 8 * 32 / 31
            shares.append((width * height / 32 ** 2).item())
    assert min(shares) > 0.2 and max(shares) <= 1.05
    assert 0.45 < sum(shares) / len(shares) < 0.8  # uniform area in [0.25, 1]: mean 0.625


def test_images_of_several_sizes_are_refused(tiny_data):
    with pytest.raises(ConfigError, match="data.loader=memory: .* several sizes"):
        memory_input(tiny_data, batch_size=4)


def test_raw_pixel_shards_come_back_exactly(tmp_path):
    """Archive -> raw-pixel shards -> memory: the validation images are the archive's test images."""
    archive = tmp_path / "cifar-10-binary.tar.gz"
    expected = cifar10_archive(archive, per_batch=3)["test"]
    run(PrepParams(train=str(archive), val=str(archive), shard_size=4, raw_pixels=True), tmp_path / "shards")
    source = memory_input(tmp_path / "shards", batch_size=4, image_size=32, eval_resize=32)
    batches = list(source.val_batches())
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(images, torch.stack([torch.from_numpy(im).permute(2, 0, 1) for im, _ in expected]))
    assert labels.tolist() == [label for _, label in expected]


@pytest.mark.slow
def test_two_processes_train_from_memory_exactly_and_resume_to_the_same_weights(cifar_shards, tmp_path):
    """The real trainer with data.loader=memory, 2 processes: validation counts every test image
    once, and a run stopped after epoch 1 and resumed ends with the weights of an uninterrupted one."""
    from test_train import EXACT, TINY, final_weights, launch, metrics

    args = [*TINY, *EXACT, "data.loader=memory", "data.augment.crop_area=[0.25,1.0]", f"data.dir={cifar_shards}",
            f"output_dir={tmp_path}", "schedule.epochs=2", "data.workers=null"]  # null: cores per process
    launch(2, *args, "name=straight", cwd=tmp_path)
    cores = len(os.sched_getaffinity(0))
    assert load_config(tmp_path / "straight/config.yaml").data.workers == max(1, cores // 2)
    records = metrics(tmp_path / "straight")
    assert [r["val_samples"] for r in records] == [17, 17]
    assert [r["train_samples"] for r in records] == [80, 80]  # 2 ranks x 10 batches of 4 of the 85
    launch(2, *args, "name=resumed", "train.max_steps=10", cwd=tmp_path)  # epoch 1 only
    launch(2, *args, "name=resumed", cwd=tmp_path)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_a_damaged_shard_stops_the_loading_naming_the_sample(cifar_shards, tmp_path):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(cifar_shards, copy)
    shard = sorted(copy.glob("train-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[1500:4000] = bytes(2500)  # inside the first sample's pixels and the next header
    shard.write_bytes(bytes(data))
    with pytest.raises(BadSampleError, match=rf"{shard}: sample \S+ .*data.loader=memory stops"):
        memory_input(copy)

"""The loader's fast paths: shard index, region JPEG decoding, raw-pixel shards, channels_last batches.

Each fast path must give what the plain path gives: the same samples (or per-sample damage
records), the same crops to within JPEG decoder rounding, and the same batches."""
from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.plan import PrepParams
from data_prep.synthetic import SyntheticSpec, generate
from data_prep.writer import run
from imaging import jpeg_region
from imaging.crops import (
    apply_crop,
    center_box,
    center_crop_image,
    random_crop_array,
    random_crop_image,
    random_resized_crop,
)
from imaging.decode import EncodedImage, draft_box, raw_pixels, resize_box
from imaging.specs import CropParams, CropSpec
from pipeline.data.batches import make_loader
from pipeline.data.prepared import Sample, Skipped, open_prepared, shard_range
from pipeline.data.webdataset_input import EvalStream, TrainStream
from shards import tar_index


# ------------------------------------------------------------------------------------------ region decoder
def photo_like(width: int, height: int, seed: int, mode: str = "RGB", subsampling: int = 2) -> bytes:
    """Smooth gradients plus texture, JPEG-encoded: closer to a photo than noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 200, y / height * 200, (x + y) / (width + height) * 255], axis=2)
    texture = rng.normal(0, 12, (height // 8 + 1, width // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:height, :width]
    image = Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, subsampling=subsampling)
    return buffer.getvalue()


def pillow_crop(data: bytes, size: int, seed: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(random_resized_crop(image, size, CropSpec(), random.Random(seed)), np.int16)


@pytest.mark.parametrize("restarts", [False, True], ids=["plain", "restart-markers"])
@pytest.mark.parametrize("width, height, mode, subsampling, size", [
    (500, 375, "RGB", 2, 224),  # ILSVRC's typical photo, 4:2:0: mostly full-scale region decodes
    (1600, 1200, "RGB", 2, 96),  # large photo: region decodes at 1/2, 1/4 and 1/8 scale
    (333, 500, "L", 0, 64),  # grayscale
    (640, 480, "RGB", 0, 128),  # 4:4:4
    (502, 371, "RGB", 1, 160),  # 4:2:2, partial MCUs at the right and bottom edges
])
def test_region_decoding_matches_pillow(region_decoder, width, height, mode, subsampling, size, restarts):
    """With restart markers the crop's MCUs are cut into a JPEG of their own and decoded: the
    same comparison with Pillow's decode of the whole (marked) file must hold."""
    data = photo_like(width, height, seed=width, mode=mode, subsampling=subsampling)
    if restarts:
        data = jpeg_region.add_restarts(data)
    assert EncodedImage.open(data) is not None  # the region decoder takes it
    means = []
    for seed in range(24):
        fast = np.asarray(random_crop_image(data, size, CropSpec(), random.Random(seed)), np.int16)
        assert fast.shape == (size, size, 3)
        means.append(np.abs(fast - pillow_crop(data, size, seed)).mean())
    # The same crop and filter; only decoder rounding differs (IDCT builds, an exact-boundary
    # pixel of the area and nearest filters), far below what a wrong region or scale gives.
    assert np.mean(means) < 0.3 and max(means) < 1.5, means
    centre = np.asarray(center_crop_image(data, size), np.int16)
    with Image.open(io.BytesIO(data)) as image:
        box = draft_box(image, center_box(*image.size, size, round(size * 256 / 224)), size)
        reference = np.asarray(resize_box(image, box, size, Image.Resampling.BILINEAR), np.int16)
    assert np.abs(centre - reference).mean() < 0.3


def test_a_shifted_region_would_be_caught(region_decoder):
    """The agreement check above is sharp: a crop one pixel off differs by much more."""
    data = photo_like(500, 375, seed=1)
    params = CropParams(100, 80, 200, 180, "bilinear", False)
    shifted = CropParams(101, 80, 200, 180, "bilinear", False)
    with Image.open(io.BytesIO(data)) as a, Image.open(io.BytesIO(data)) as b:
        diff = np.abs(np.asarray(apply_crop(a, params, 224), np.int16)
                      - np.asarray(apply_crop(b, shifted, 224), np.int16)).mean()
    assert diff > 1.5


def restart_segments(data: bytes) -> list[int]:
    """Offsets of the RST markers of a JPEG's entropy-coded data."""
    start = data.index(b"\xff\xda") + 2
    start += int.from_bytes(data[start:start + 2], "big")
    return [i for i in range(start, len(data) - 1) if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7]


@pytest.mark.parametrize("subsampling, progressive", [(2, False), (0, False), (1, True)])
def test_restart_markers_keep_every_pixel(region_decoder, subsampling, progressive):
    """``add_restarts`` rewrites the coefficients, not the pixels: a restart after every MCU,
    baseline (also from a progressive file), and Pillow decodes it to the same image; regions
    decoded through the cut-out path equal the plain file's, except the one pixel at the edge of
    the cut, where libjpeg upsamples the chroma as at an image edge (the crop margin covers it)."""
    source = io.BytesIO()
    Image.open(io.BytesIO(photo_like(500, 375, seed=7, subsampling=subsampling))).save(
        source, format="JPEG", quality=92, subsampling=subsampling, progressive=progressive)
    data = source.getvalue()
    marked = jpeg_region.add_restarts(data)
    mcu_width, mcu_height = {0: (8, 8), 1: (16, 8), 2: (16, 16)}[subsampling]  # 4:4:4, 4:2:2, 4:2:0
    assert marked[:2] == b"\xff\xd8" and b"\xff\xdd\x00\x04\x00\x01" in marked  # DRI = 1 MCU
    assert len(restart_segments(marked)) == -(-500 // mcu_width) * -(-375 // mcu_height) - 1
    with Image.open(io.BytesIO(marked)) as a, Image.open(io.BytesIO(data)) as b:
        assert not a.info.get("progressive")
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rng = random.Random(subsampling)
    for scale in (1, 2, 4, 8):
        width, height = jpeg_region.scaled_size(500, 375, scale)
        for _ in range(15):
            left, top = rng.randrange(width - 2), rng.randrange(height - 2)
            right, bottom = rng.randint(left + 3, width), rng.randint(top + 3, height)
            plain, plain_left = jpeg_region.decode_region(data, 500, scale, left, top, right, bottom)
            cut, cut_left = jpeg_region.decode_region(marked, 500, scale, left, top, right, bottom)
            a = plain[1:-1, left - plain_left + 1:right - plain_left - 1]
            b = cut[1:-1, left - cut_left + 1:right - cut_left - 1]
            np.testing.assert_array_equal(a, b, err_msg=f"scale {scale} region {left, top, right, bottom}")


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
@pytest.mark.parametrize("mode, subsampling", [("RGB", 2), ("RGB", 0), ("RGB", 1), ("L", 0)],
                         ids=["4:2:0", "4:4:4", "4:2:2", "grey"])
def test_a_restart_marked_crop_reads_only_its_mcus(region_decoder, mode, subsampling, scale):
    """Garbage in the first MCU row's codes (markers kept) does not touch a crop below it: the
    cut-out path never reads them, where the plain path would have to Huffman-decode them."""
    marked = bytearray(jpeg_region.add_restarts(photo_like(500, 375, seed=8, mode=mode, subsampling=subsampling)))
    intact = bytes(marked)
    markers = restart_segments(intact)
    for i in range(markers[0] + 2, markers[30]):  # MCUs 1..30 of row 0 (32 or more per row)
        if marked[i] != 0xFF and marked[i - 1] != 0xFF:
            marked[i] = 0x55
    box = (100 // scale, 200 // scale, 300 // scale, 300 // scale)
    region = jpeg_region.decode_region(bytes(marked), 500, scale, *box)
    np.testing.assert_array_equal(region[0], jpeg_region.decode_region(intact, 500, scale, *box)[0])
    # The damage is real where it is read: an error, or other pixels.
    top = (0, 0, 300 // scale, 40 // scale)
    try:
        damaged = jpeg_region.decode_region(bytes(marked), 500, scale, *top)[0]
    except jpeg_region.RegionDecodeError:
        return
    assert not np.array_equal(damaged, jpeg_region.decode_region(intact, 500, scale, *top)[0])


def test_a_restart_marked_file_cut_short_is_judged_by_the_whole_stream(region_decoder):
    marked = jpeg_region.add_restarts(photo_like(500, 375, seed=9))
    cut = marked[:restart_segments(marked)[200]]  # the segments of rows 7.. are gone
    with pytest.raises(jpeg_region.RegionDecodeError):  # too few segments: the plain path warns
        jpeg_region.decode_region(cut, 500, 1, 100, 250, 300, 370)
    # Above the cut the crop still decodes, as it would from the plain file.
    assert jpeg_region.decode_region(cut, 500, 1, 100, 20, 300, 90)[0].shape[0] == 70


def test_region_decoder_leaves_what_it_cannot_do_to_pillow(region_decoder):
    cmyk = io.BytesIO()
    Image.new("CMYK", (64, 48), (10, 20, 30, 40)).save(cmyk, format="JPEG")
    assert EncodedImage.open(cmyk.getvalue()) is None  # CMYK: Pillow converts it
    assert random_crop_image(cmyk.getvalue(), 32, CropSpec(), random.Random(0)).size == (32, 32)
    truncated = photo_like(500, 375, seed=2)[:4000]
    with pytest.raises(OSError, match="truncated"):  # libjpeg only warns; Pillow's verdict stands
        random_crop_image(truncated, 224, CropSpec(area=(1.0, 1.0)), random.Random(0))


def test_without_the_region_decoder_pillow_decodes(region_decoder):
    data = photo_like(500, 375, seed=3)
    with_library = random_crop_image(data, 224, CropSpec(), random.Random(4))
    saved = jpeg_region._lib
    jpeg_region.use_library(None)
    try:
        assert EncodedImage.open(data) is None
        plain = np.asarray(random_crop_image(data, 224, CropSpec(), random.Random(4)), np.int16)
    finally:
        jpeg_region._lib = saved
    assert np.abs(plain - pillow_crop(data, 224, 4)).max() == 0
    assert np.abs(np.asarray(with_library, np.int16) - plain).mean() < 1.5


# ------------------------------------------------------------------------------------------ raw pixels
@pytest.fixture(scope="module")
def raw_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    generate(root / "images", SyntheticSpec(num_classes=3, train_per_class=8, val_per_class=2, min_side=24,
                                            max_side=40, seed=3))
    images = root / "images"
    params = PrepParams(train=str(images / "train"), val=str(images / "val"),
                        val_labels=str(images / "val_labels.txt"), shard_size=5, raw_pixels=True)
    run(params, root / "shards")
    return root / "shards"


def test_raw_pixel_shards_are_recorded_and_read_without_decoding(raw_data):
    manifest = json.loads((raw_data / "manifest.json").read_text())
    assert manifest["parameters"]["raw_pixels"] is True
    with tarfile.open(raw_data / "train-000000.tar") as tar:
        assert {Path(n).suffix for n in tar.getnames()} == {".ppm", ".cls", ".json"}
    data = open_prepared(raw_data)
    items = list(shard_range(data.train[0], 0, data.train[0].samples, data.num_classes))
    assert all(isinstance(item, Sample) for item in items)
    for seed, item in enumerate(items):
        pixels = raw_pixels(item.data)
        with Image.open(io.BytesIO(item.data)) as image:  # a PPM: Pillow reads the same pixels
            assert np.array_equal(pixels, np.asarray(image))
            reference = random_resized_crop(image, 16, CropSpec(), random.Random(seed))
        fast = random_crop_image(item.data, 16, CropSpec(), random.Random(seed))
        assert np.array_equal(np.asarray(fast), np.asarray(reference))  # the same crop, exactly


def test_raw_pixels_flag_of_the_command(tmp_path):
    from data_prep.cli import build_parser

    args = build_parser().parse_args(["shards", "--train", "t", "--out", str(tmp_path), "--raw-pixels"])
    assert args.raw_pixels is True
    assert "raw_pixels" not in PrepParams(train="t").to_json()  # older preparations still resume


def test_reencoded_shards_hold_quality_90_jpegs_and_say_so(tmp_path):
    """``data_prep shards --reencode``: every JPEG re-encoded at --quality (FFCV's storage), each
    one recorded with its reason, the option in the manifest; without it the original bytes."""
    from data_prep.cli import main

    generate(tmp_path / "images", SyntheticSpec(num_classes=2, train_per_class=3, val_per_class=1, min_side=40,
                                                max_side=64, seed=5))
    images = tmp_path / "images"
    sources = ["--train", str(images / "train"), "--val", str(images / "val"),
               "--val-labels", str(images / "val_labels.txt"), "--workers", "1"]
    assert main(["shards", *sources, "--out", str(tmp_path / "kept")]) == 0
    assert main(["shards", *sources, "--out", str(tmp_path / "reencoded"), "--reencode", "--quality", "90"]) == 0
    manifest = json.loads((tmp_path / "reencoded" / "manifest.json").read_text())
    assert manifest["parameters"]["reencode"] is True
    assert "reencode" not in json.loads((tmp_path / "kept" / "manifest.json").read_text())["parameters"]
    kept = {s.key: s for s in shard_range(open_prepared(tmp_path / "kept").train[0], 0, 5, 2)}
    for sample in shard_range(open_prepared(tmp_path / "reencoded").train[0], 0, 5, 2):
        original = kept[sample.key].data
        assert sample.data != original
        with Image.open(io.BytesIO(sample.data)) as stored, Image.open(io.BytesIO(original)) as source:
            assert stored.format == "JPEG" and stored.size == source.size
            reference = io.BytesIO()
            source.convert("RGB").save(reference, format="JPEG", quality=90)
            assert stored.quantization == Image.open(reference).quantization  # quality 90's tables
    with tarfile.open(tmp_path / "reencoded" / "train-000000.tar") as tar:
        records = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert records and all(r["converted"] == "re-encoded at quality 90" for r in records)


def test_shards_with_restart_markers_hold_the_same_pixels(region_decoder, tmp_path):
    """``data_prep shards --restart-markers``: kept JPEGs rewritten losslessly, converted ones
    (here a grayscale JPEG) written with the markers too; the loader's crops are the same."""
    from data_prep.cli import main

    generate(tmp_path / "images", SyntheticSpec(num_classes=2, train_per_class=3, val_per_class=1, min_side=64,
                                                max_side=96, seed=6))
    images = tmp_path / "images"
    grey = sorted((images / "train").rglob("*.JPEG"))[0]
    Image.open(grey).convert("L").save(grey, format="JPEG", quality=90)
    sources = ["--train", str(images / "train"), "--val", str(images / "val"),
               "--val-labels", str(images / "val_labels.txt"), "--workers", "1"]
    assert main(["shards", *sources, "--out", str(tmp_path / "kept")]) == 0
    assert main(["shards", *sources, "--out", str(tmp_path / "marked"), "--restart-markers"]) == 0
    assert json.loads((tmp_path / "marked" / "manifest.json").read_text())["parameters"]["restart_markers"] is True
    assert "restart_markers" not in json.loads((tmp_path / "kept" / "manifest.json").read_text())["parameters"]
    kept = {s.key: s.data for s in shard_range(open_prepared(tmp_path / "kept").train[0], 0, 6, 2)}
    marked = list(shard_range(open_prepared(tmp_path / "marked").train[0], 0, 6, 2))
    assert len(marked) == len(kept) == 6
    for sample in marked:
        assert b"\xff\xdd\x00\x04\x00\x01" in sample.data  # a restart interval of one MCU
        with Image.open(io.BytesIO(sample.data)) as a, Image.open(io.BytesIO(kept[sample.key])) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        for seed in range(3):
            np.testing.assert_array_equal(
                random_crop_array(sample.data, 48, CropSpec(), random.Random(seed)),
                random_crop_array(kept[sample.key], 48, CropSpec(), random.Random(seed)))


def test_raw_pixels_take_no_jpeg_options_and_a_changed_option_is_named(tmp_path):
    from shards.manifest import PrepError

    for option in ("reencode", "restart_markers"):
        with pytest.raises(ValueError, match=option):
            PrepParams(train="t", raw_pixels=True, **{option: True})
    generate(tmp_path / "images", SyntheticSpec(num_classes=2, train_per_class=2, val_per_class=1, seed=6))
    train = str(tmp_path / "images" / "train")
    run(PrepParams(train=train, reencode=True), tmp_path / "out")
    with pytest.raises(PrepError, match="parameters differ: reencode"):  # resumed without the option
        run(PrepParams(train=train), tmp_path / "out")


def test_restart_markers_need_the_library(region_decoder, tmp_path):
    from shards.manifest import PrepError

    generate(tmp_path / "images", SyntheticSpec(num_classes=2, train_per_class=2, val_per_class=1, seed=6))
    saved = jpeg_region._lib
    jpeg_region.use_library(None)
    try:
        with pytest.raises(PrepError, match="jpeg_region build"):
            run(PrepParams(train=str(tmp_path / "images" / "train"), restart_markers=True), tmp_path / "out")
    finally:
        jpeg_region._lib = saved
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------ shard index
def test_each_shard_has_an_index_of_its_members(tiny_data):
    shard = tiny_data / "train-000000.tar"
    entries = tar_index.load_index(shard)
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
    assert len(entries) == len(members) // 3
    for entry, group in zip(entries, zip(*[iter(members)] * 3)):
        assert entry.offset == group[0].offset and entry.key == group[0].name.split(".")[0]
        assert {f: (entry.offset + start, size) for f, (start, size) in entry.fields.items()} == {
            m.name.split(".", 1)[1]: (m.offset_data, m.size) for m in group}
    assert tar_index.scan(shard) == (entries, None)  # what the loader builds for a shard without one
    record = json.loads((tiny_data / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    assert record["index"] == "train-000000.tar.idx"


def damaged_copy(tiny_data: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    return copy


def test_damage_spoils_only_the_samples_it_covers(tiny_data, tmp_path):
    """With the index, a zeroed header loses one sample (named by its key): the samples after it
    are read, where walking the tar loses the rest of the shard."""
    copy = damaged_copy(tiny_data, tmp_path)
    path = copy / "train-000002.tar"
    entries = tar_index.load_index(path)
    raw = bytearray(path.read_bytes())
    raw[entries[1].offset:entries[1].offset + 512] = bytes(512)
    path.write_bytes(bytes(raw))
    data = open_prepared(copy)
    items = list(shard_range(data.train[2], 0, data.train[2].samples, data.num_classes))
    assert [type(item).__name__ for item in items] == ["Sample", "Skipped", "Sample", "Sample", "Sample"]
    assert items[1].key == entries[1].key and "damaged tar header" in items[1].reason
    (copy / "train-000002.tar.idx").unlink()  # a shard from an older version: its tar is walked
    items = list(shard_range(data.train[2], 0, data.train[2].samples, data.num_classes))
    assert isinstance(items[0], Sample) and all(isinstance(item, Skipped) for item in items[1:])
    assert all("ends after 1 samples" in item.reason for item in items[1:])  # tarfile: a zero block ends a tar


def test_a_truncated_shard_keeps_the_samples_before_the_cut(tiny_data, tmp_path):
    copy = damaged_copy(tiny_data, tmp_path)
    path = copy / "train-000001.tar"
    entries = tar_index.load_index(path)
    path.write_bytes(path.read_bytes()[:entries[3].offset + 700])
    data = open_prepared(copy)
    items = list(shard_range(data.train[1], 0, data.train[1].samples, data.num_classes))
    assert [isinstance(item, Sample) for item in items] == [True, True, True, False, False]
    assert all("missing" in item.reason or "tar breaks" in item.reason for item in items[3:])


@pytest.mark.parametrize("damage", ["null", "shape", "huge"])
def test_a_damaged_index_is_ignored_and_the_tar_walked(tiny_data, tmp_path, damage):
    """An index that is not what preparation wrote (another JSON shape, an entry pointing outside
    the shard) must not crash a loader worker nor make it read what is not there."""
    copy = damaged_copy(tiny_data, tmp_path)
    path = copy / "train-000001.tar"
    index = tar_index.index_path(path)
    payload = json.loads(index.read_text())
    if damage == "null":
        index.write_text("null")
    elif damage == "shape":
        payload["samples"][0] = {"key": "x", "offset": 0, "length": 1, "fields": {}}
        index.write_text(json.dumps(payload))
    else:
        payload["samples"][2][2] = 10**12  # a length far past the shard's end
        index.write_text(json.dumps(payload))
    assert tar_index.load_index(path) is None
    data = open_prepared(copy)
    items = list(shard_range(data.train[1], 0, data.train[1].samples, data.num_classes))
    assert all(isinstance(item, Sample) for item in items) and len(items) == data.train[1].samples


def test_index_and_tar_walk_give_the_same_batches(tiny_data, tmp_path):
    copy = damaged_copy(tiny_data, tmp_path)
    for index in copy.glob("*.idx"):
        index.unlink()

    def batches(directory):
        data = open_prepared(directory)
        stream = TrainStream(data.train, batch_size=4, batches_per_epoch=6, rank=0, world_size=1, seed=0,
                             image_size=32, crop=CropSpec(), baked=False, shuffle_buffer=20,
                             eval_resize=36, num_classes=data.num_classes)
        stream.set_epoch(0)
        return [(x.clone(), y.clone()) for x, y, _ in make_loader(stream, 0, pin_memory=False)]

    for (x, y), (x2, y2) in zip(batches(tiny_data), batches(copy), strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)


# ------------------------------------------------------------------------------------------ batches
def test_batches_are_channels_last_views_and_keep_that_layout(tiny_data):
    data = open_prepared(tiny_data)
    stream = TrainStream(data.train, batch_size=4, batches_per_epoch=3, rank=0, world_size=1, seed=0,
                         image_size=32, crop=CropSpec(), baked=False, shuffle_buffer=20, eval_resize=36,
                         num_classes=data.num_classes)
    stream.set_epoch(0)
    val = EvalStream(data.val, batch_size=3, rank=0, world_size=1, image_size=32, resize=36,
                     num_classes=data.num_classes)
    for loader in (make_loader(stream, 2, pin_memory=False), make_loader(val, 0, pin_memory=False)):
        for x, y, _ in loader:
            assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.uint8 and len(x) == len(y)
            assert x.is_contiguous(memory_format=torch.channels_last)
            assert x.to(torch.float32).is_contiguous(memory_format=torch.channels_last)
            if torch.cuda.is_available():
                assert x.pin_memory().is_contiguous(memory_format=torch.channels_last)
                assert x.to("cuda").is_contiguous(memory_format=torch.channels_last)


def test_verify_checks_raw_pixel_shards_and_indexes(raw_data, tmp_path):
    from data_prep import verify

    assert verify.verify(raw_data) == []
    copy = tmp_path / "copy"
    shutil.copytree(raw_data, copy)
    (copy / "val-000000.tar.idx").write_text('{"version": 1, "shard_bytes": 0, "samples": []}')
    problems = verify.verify(copy)
    assert len(problems) == 1 and "val-000000.tar.idx: missing, or does not match" in problems[0]


def test_persistent_workers_go_on_with_the_next_epoch_exactly(tiny_data):
    from pipeline.data.webdataset_input import WebDatasetInput

    data = open_prepared(tiny_data)

    def stream():
        return TrainStream(data.train, batch_size=4, batches_per_epoch=6, rank=0, world_size=1, seed=0,
                           image_size=32, crop=CropSpec(), baked=False, shuffle_buffer=20,
                           eval_resize=36, num_classes=data.num_classes)

    def fresh(epoch, start_batch=0):
        s = stream()
        s.set_epoch(epoch, start_batch)
        return [(x.clone(), y.clone()) for x, y, _ in make_loader(s, 2, pin_memory=False)]

    loader_input = WebDatasetInput(stream(), None, workers=2, pin_memory=False)
    seen, workers = [], []
    for epoch, start in ((0, 0), (1, 0), (2, 0), (2, 4), (3, 0)):  # (2, 4): a resume mid-epoch
        batches = loader_input.train_batches(epoch, start)
        seen.append([(x.clone(), y.clone()) for x, y, _ in batches])
        workers.append([w.pid for w in batches._workers])
    assert workers[0] == workers[1] == workers[2] and workers[3] != workers[2] and workers[4] == workers[3]
    for (epoch, start), got in zip(((0, 0), (1, 0), (2, 0), (2, 4), (3, 0)), seen):
        expected = fresh(epoch, start)
        assert len(got) == len(expected) == 6 - start
        assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(got, expected))

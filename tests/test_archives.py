"""CIFAR-10, CIFAR-100 and STL-10 binary archives as preparation sources: small archives built
here in the official byte layouts, prepared into real shards and read back."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import subprocess_env
from PIL import Image

from data_prep.archives import scan_archive
from data_prep.plan import PrepParams
from data_prep.sources import SourceError
from data_prep.writer import run

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def random_images(count: int, side: int, seed: int) -> np.ndarray:
    """(count, side, side, 3) uint8: a smooth brightness pattern, different along x and y (so that
    a transposed or mirrored reading differs), under a tint of its own per image (JPEG's chroma
    subsampling would blur colour detail, which is not what these tests are about)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] * (2 * np.pi / side)
    images = []
    for _ in range(count):
        a, b = rng.uniform(0.5, 2.5, 2)
        p, q = rng.uniform(0, 2 * np.pi, 2)
        brightness = 60 * np.sin(a * x + p) + 30 * np.cos(b * y + q) + 0.3 * (x - y) * side / (2 * np.pi)
        tint = rng.uniform(-30, 30, 3)
        images.append((127.5 + brightness[..., None] + tint).clip(0, 255).round().astype(np.uint8))
    return np.stack(images)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_targz(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


def cifar_records(images: np.ndarray, *label_columns: np.ndarray) -> bytes:
    """Label bytes, then the R, G and B planes (each row-major) of every image."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([*(c.astype(np.uint8)[:, None] for c in label_columns), planes], axis=1).tobytes()


def cifar10_archive(path: Path, per_batch: int = 4) -> dict:
    """Five training batches and a test batch, classes cycling so that each appears."""
    split = {"train": [], "test": []}
    members = [("cifar-10-batches-bin/readme.html", b"<html></html>"),
               ("cifar-10-batches-bin/batches.meta.txt", ("\n".join(CIFAR10_NAMES) + "\n\n").encode())]
    for i, name in enumerate([f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]):
        images = random_images(per_batch, 32, seed=i)
        labels = (np.arange(per_batch) + 3 * i) % 10
        members.append((f"cifar-10-batches-bin/{name}.bin", cifar_records(images, labels)))
        split["test" if name == "test_batch" else "train"] += list(zip(images, labels.tolist()))
    write_targz(path, members)
    return split


def stl10_archive(path: Path, train: int = 10, test: int = 6) -> dict:
    split = {}
    members = []
    for name, count, seed in (("test", test, 7), ("train", train, 8)):
        images = random_images(count, 96, seed)
        labels = np.arange(count) % 10 + 1  # 1..10
        # Column-major per channel: byte (c, x, y)
        members += [(f"stl10_binary/{name}_X.bin", images.transpose(0, 3, 2, 1).tobytes()),
                    (f"stl10_binary/{name}_y.bin", labels.astype(np.uint8).tobytes())]
        split[name] = list(zip(images, (labels - 1).tolist()))
    members += [("stl10_binary/unlabeled_X.bin", random_images(2, 96, 9).transpose(0, 3, 2, 1).tobytes()),
                ("stl10_binary/class_names.txt", "\n".join(STL10_NAMES).encode()),
                ("stl10_binary/fold_indices.txt", b"0 1 2\n")]
    write_targz(path, members)
    return split


def decoded(ref) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(ref.read())).convert("RGB"))


def test_cifar10_sources_are_the_archives_pixels_labels_and_names(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    expected = cifar10_archive(archive)
    for option, split in (("train", "train"), ("val", "test")):
        refs = scan_archive(archive, option)
        assert len(refs) == len(expected[split])
        for ref, (image, label) in zip(refs, expected[split]):
            assert np.array_equal(decoded(ref), image)  # lossless, in the right orientation
            assert ref.class_id == CIFAR10_NAMES[label]
    assert refs[0].name == "test_batch/00000.png"


def test_cifar100_uses_the_fine_labels(tmp_path):
    fine_names = [f"fine{i:02d}" for i in range(100)]
    images = random_images(6, 32, seed=3)
    fine, coarse = np.array([0, 99, 42, 7, 7, 63]), np.array([19, 0, 3, 1, 2, 4])
    archive = write_targz(tmp_path / "cifar-100-binary.tar.gz", [
        ("cifar-100-binary/coarse_label_names.txt", b"c0\nc1\n"),
        ("cifar-100-binary/fine_label_names.txt", "\n".join(fine_names).encode()),
        ("cifar-100-binary/train.bin", cifar_records(images, coarse, fine)),
        ("cifar-100-binary/test.bin", cifar_records(images[:2], coarse[:2], fine[:2])),
    ])
    refs = scan_archive(archive, "train")
    assert [r.class_id for r in refs] == [fine_names[i] for i in fine]
    assert all(np.array_equal(decoded(r), im) for r, im in zip(refs, images))
    assert len(scan_archive(archive, "val")) == 2


def test_stl10_column_major_images_come_out_upright(tmp_path):
    archive = tmp_path / "stl10_binary.tar.gz"
    expected = stl10_archive(archive)
    for option, split in (("train", "train"), ("val", "test")):
        refs = scan_archive(archive, option)
        assert len(refs) == len(expected[split])  # the unlabeled images are not among them
        for ref, (image, label) in zip(refs, expected[split]):
            assert np.array_equal(decoded(ref), image)
            assert ref.class_id == STL10_NAMES[label]


def read_split(out: Path, split: str) -> list[tuple[np.ndarray, int, dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    urls = [str(out / s["name"]) for s in manifest["splits"][split]["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False).to_tuple("jpg", "cls", "json")
    return [(np.asarray(Image.open(io.BytesIO(jpg))), int(cls), json.loads(meta)) for jpg, cls, meta in dataset]


@pytest.mark.parametrize("dataset", ["cifar10", "stl10"])
def test_archive_to_shards_with_the_command_line(tmp_path, dataset):
    """``--train A --val A``: the train and test parts of one archive, through the real command."""
    if dataset == "cifar10":
        archive, names, side = tmp_path / "cifar-10-binary.tar.gz", CIFAR10_NAMES, 32
        expected = cifar10_archive(archive)
    else:
        archive, names, side = tmp_path / "stl10_binary.tar.gz", STL10_NAMES, 96
        expected = stl10_archive(archive)
    out = tmp_path / "shards"
    result = subprocess.run([sys.executable, "-m", "data_prep", "shards", "--train", str(archive), "--val", str(archive),
                             "--out", str(out), "--shard-size", "7", "--quality", "95", "--workers", "2"],
                            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == names  # from the archive; alphabetical, so indices = labels
    for split, part in (("train", "train"), ("val", "test")):
        assert manifest["splits"][split]["samples"] == len(expected[part])
        by_name = {}
        for image, label, meta in read_split(out, split):
            by_name[meta["name"]] = (image, label)
            assert manifest["classes"][label]["id"] == meta["class_id"]
        assert len(by_name) == len(expected[part])
        # Training samples are shuffled: match them back by their recorded names, in archive order.
        for (image, label), (want_image, want_label) in zip((by_name[n] for n in sorted(by_name, key=order_key)),
                                                            expected[part]):
            assert label == want_label
            assert image.shape == (side, side, 3)
            # Stored as JPEG (quality 95, chroma subsampled): close to the archive's pixels, not
            # equal; far closer than the same pixels read in the wrong orientation.
            error = np.abs(image.astype(int) - want_image.astype(int)).mean()
            assert error < 6 and error < 0.2 * np.abs(image.astype(int) - want_image.transpose(1, 0, 2)).mean()


def order_key(name: str) -> tuple[str, int]:
    """Archive order of recorded names: data_batch_1..5 then test_batch, image index within."""
    member, index = name.split("/")
    return member, int(index.split(".")[0])


def test_a_damaged_or_foreign_archive_is_refused_naming_file_and_member(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    cifar10_archive(archive)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(SourceError, match=r"cut\.tar\.gz: damaged or unreadable archive \(at member"):
        scan_archive(cut, "train")

    short = write_targz(tmp_path / "short.tar.gz", [("b/batches.meta.txt", "\n".join(CIFAR10_NAMES).encode()),
                                                    ("b/test_batch.bin", b"\x00" * 3000)])
    with pytest.raises(SourceError, match=r"short\.tar\.gz: member 'test_batch\.bin' holds 3000 bytes"):
        scan_archive(short, "val")
    with pytest.raises(SourceError, match=r"short\.tar\.gz: CIFAR-10 archive lacks member 'data_batch_1\.bin'"):
        scan_archive(short, "train")

    bad_label = write_targz(tmp_path / "label.tar.gz", [
        ("b/batches.meta.txt", "\n".join(CIFAR10_NAMES).encode()),
        ("b/test_batch.bin", cifar_records(random_images(2, 32, 0), np.array([1, 12])))])
    with pytest.raises(SourceError, match=r"member 'test_batch\.bin', image 1: label 12 is outside"):
        scan_archive(bad_label, "val")

    stl_bad = write_targz(tmp_path / "stl.tar.gz", [
        ("s/class_names.txt", "\n".join(STL10_NAMES).encode()),
        ("s/test_X.bin", random_images(2, 96, 0).tobytes()), ("s/test_y.bin", bytes([0, 3]))])
    with pytest.raises(SourceError, match=r"member 'test_X\.bin', image 0: label 0 is outside 1\.\.10"):
        scan_archive(stl_bad, "val")

    foreign = write_targz(tmp_path / "other.tar.gz", [("x/readme.txt", b"hello")])
    with pytest.raises(SourceError, match=r"other\.tar\.gz: not a binary archive of CIFAR-10, CIFAR-100, STL-10"):
        scan_archive(foreign, "train")


def test_labels_options_are_refused_with_an_archive(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    cifar10_archive(archive, per_batch=1)
    (tmp_path / "labels.txt").write_text("a b\n")
    params = PrepParams(train=str(archive), val=str(archive), val_labels=str(tmp_path / "labels.txt"))
    with pytest.raises(SourceError, match="holds its own test labels"):
        run(params, tmp_path / "out")


def test_raw_pixel_shards_hold_the_archives_pixels_exactly(tmp_path):
    """With --raw-pixels nothing is lossy: every stored image is the archive's, bit for bit."""
    archive = tmp_path / "stl10_binary.tar.gz"
    expected = stl10_archive(archive, train=6, test=4)
    out = tmp_path / "raw"
    manifest = run(PrepParams(train=str(archive), val=str(archive), shard_size=4, raw_pixels=True), out)
    for split, part in (("train", "train"), ("val", "test")):
        urls = [str(out / s["name"]) for s in manifest["splits"][split]["shards"]]
        stored = {json.loads(meta)["name"]: (np.asarray(Image.open(io.BytesIO(ppm))), int(cls))
                  for ppm, cls, meta in wds.WebDataset(urls, shardshuffle=False).to_tuple("ppm", "cls", "json")}
        assert len(stored) == len(expected[part])
        for name, (want_image, want_label) in zip(sorted(stored, key=order_key), expected[part]):
            image, label = stored[name]
            assert np.array_equal(image, want_image) and label == want_label
        # Pixels stored as pixels: nothing was converted (the format is the manifest's raw_pixels).
        assert manifest["splits"][split]["converted"] == 0

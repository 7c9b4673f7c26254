"""Data preparation: sources, shards, manifest, resumption, array tasks, bad input, verify."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import pytest
import webdataset as wds
from imagefiles import class_folders, devkit_archive, ilsvrc_train_tar, image_bytes, tar_of
from PIL import Image

from data_prep import encode, verify
from data_prep.plan import PrepParams
from data_prep.sources import SourceError
from data_prep.writer import run
from shards import manifest as manifest_mod

WNIDS = ["n01440764", "n01443537", "n01484850"]


def read_back(directory: Path, split: str) -> list[tuple[bytes, int, dict]]:
    """Every sample of a split, read with plain webdataset in manifest order."""
    manifest = json.loads((directory / "manifest.json").read_text())
    urls = [str(directory / s["name"]) for s in manifest["splits"][split]["shards"]]
    dataset = wds.WebDataset(urls, shardshuffle=False).to_tuple("jpg", "cls", "json")
    return [(jpg, int(cls), json.loads(meta)) for jpg, cls, meta in dataset]


def prep(tmp_path: Path, **kwargs) -> tuple[Path, dict]:
    out = tmp_path / "out"
    params = PrepParams(**{"shard_size": 4, **kwargs})
    return out, run(params, out, workers=kwargs.pop("workers", 1))


def test_class_folders_round_trip_with_plain_webdataset(tmp_path):
    train = class_folders(tmp_path / "train", {"dog": 5, "cat": 4, "emu": 3}, seed=1)
    val = class_folders(tmp_path / "val", {"dog": 2, "cat": 2, "emu": 2}, seed=2)
    out, manifest = prep(tmp_path, train=str(tmp_path / "train"), val=str(tmp_path / "val"))

    assert [c["id"] for c in manifest["classes"]] == ["cat", "dog", "emu"]  # sorted, as torchvision
    for split, files in (("train", train), ("val", val)):
        samples = read_back(out, split)
        assert len(samples) == len(files) == manifest["splits"][split]["samples"]
        for jpg, label, meta in samples:
            assert jpg == files[meta["name"]]  # RGB JPEGs keep their original bytes
            assert manifest["classes"][label]["id"] == meta["name"].split("/")[0]
    # webdataset's documented decoding path works on the shards as written
    urls = [str(out / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    images = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls"))
    assert len(images) == 12 and all(isinstance(im, Image.Image) for im, _ in images)
    # tar can list them too
    listing = subprocess.run(["tar", "-tf", str(out / "train-000000.tar")], capture_output=True, text=True, check=True)
    assert len(listing.stdout.split()) == 3 * 4
    # sha256 and byte counts in the manifest are the files'
    for shard in manifest["splits"]["train"]["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    assert manifest["totals"]["found"] == 18 and manifest["totals"]["skipped"] == 0


def test_training_order_is_shuffled_globally_and_deterministically(tmp_path):
    class_folders(tmp_path / "train", {f"c{i}": 20 for i in range(4)})
    out, manifest = prep(tmp_path, train=str(tmp_path / "train"), shard_size=10, seed=3)
    labels = [label for _, label, _ in read_back(out, "train")]
    assert sorted(labels) != labels
    first_shards = [set(labels[i:i + 10]) for i in range(0, 80, 10)]
    assert all(len(s) >= 2 for s in first_shards)  # no class-grouped shard
    same = run(PrepParams(train=str(tmp_path / "train"), shard_size=10, seed=3), tmp_path / "again")
    other = run(PrepParams(train=str(tmp_path / "train"), shard_size=10, seed=4), tmp_path / "other")
    shas = lambda m: [s["sha256"] for s in m["splits"]["train"]["shards"]]  # noqa: E731
    assert shas(same) == shas(manifest) != shas(other)
    # Without baked copies every training shard is in copy group 0, read in every epoch; the
    # plan does not mention groups, so preparations from before groups existed still resume.
    assert {s["group"] for s in manifest["splits"]["train"]["shards"]} == {0}
    assert "group" not in (out / manifest_mod.PLAN_FILE).read_text()


def test_validation_keeps_its_order_with_text_labels(tmp_path):
    class_folders(tmp_path / "train", {w: 2 for w in WNIDS})
    (tmp_path / "val").mkdir()
    order = [WNIDS[i % 3] for i in range(7)][::-1]
    lines = []
    for i, wnid in enumerate(order, start=1):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        (tmp_path / "val" / name).write_bytes(image_bytes(i))
        lines.append(f"{name} {wnid}")
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    out, _ = prep(tmp_path, train=str(tmp_path / "train"), val=str(tmp_path / "val"), val_labels=str(tmp_path / "labels.txt"))
    samples = read_back(out, "val")
    assert [m["name"] for _, _, m in samples] == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 8)]
    assert [WNIDS[label] for _, label, _ in samples] == order


def test_ilsvrc_archives_streamed_with_csv_and_devkit_labels(tmp_path):
    train_files = ilsvrc_train_tar(tmp_path / "ILSVRC2012_img_train.tar", {w: 3 for w in WNIDS})
    val_wnids = [WNIDS[i % 3] for i in range(5)]
    val_files = {f"ILSVRC2012_val_{i:08d}.JPEG": image_bytes(100 + i) for i in range(1, 6)}
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(tar_of(val_files))
    csv_rows = ["ImageId,PredictionString"] + [
        f"ILSVRC2012_val_{i:08d},{w} 1 2 30 40 {w} 5 6 7 8" for i, w in enumerate(val_wnids, start=1)
    ]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(csv_rows) + "\n")
    devkit_archive(tmp_path / "devkit.tar.gz", WNIDS, val_wnids)
    common = dict(train=str(tmp_path / "ILSVRC2012_img_train.tar"), val=str(tmp_path / "ILSVRC2012_img_val.tar"))

    out, manifest = prep(tmp_path, **common, val_labels=str(tmp_path / "LOC_val_solution.csv"))
    train = read_back(out, "train")
    assert {m["name"]: jpg for jpg, _, m in train} == train_files
    assert all(WNIDS[label] == m["name"].split("/")[0] for _, label, m in train)
    assert [WNIDS[label] for _, label, _ in read_back(out, "val")] == val_wnids

    dk = run(PrepParams(**common, devkit=str(tmp_path / "devkit.tar.gz"), shard_size=4), tmp_path / "dk")
    assert [WNIDS[label] for _, label, _ in read_back(tmp_path / "dk", "val")] == val_wnids
    assert [c["name"] for c in dk["classes"]] == [f"name of {w}, alias" for w in WNIDS]
    assert [s["sha256"] for s in dk["splits"]["val"]["shards"]] == [
        s["sha256"] for s in manifest["splits"]["val"]["shards"]
    ]


def test_class_names_file_and_torchvision_names_for_ilsvrc(tmp_path):
    from data_prep.plan import _imagenet_names

    class_folders(tmp_path / "train", {w: 1 for w in WNIDS})
    (tmp_path / "names.txt").write_text("".join(f"{w} Name {i}\n" for i, w in enumerate(WNIDS)))
    _, manifest = prep(tmp_path, train=str(tmp_path / "train"), class_names=str(tmp_path / "names.txt"))
    assert [c["name"] for c in manifest["classes"]] == ["Name 0", "Name 1", "Name 2"]
    thousand = [f"n{i:08d}" for i in range(1000)]
    names = _imagenet_names(thousand)
    assert names["n00000000"] == "tench" and names["n00000999"] == "toilet tissue"
    assert _imagenet_names(thousand[:999]) is None


def test_awkward_file_names_give_one_sample_each(tmp_path):
    names = ["a.b.c.JPEG", "with space.jpg", "quote'\"s.jpeg", "ünïcødé 图像.JPEG", "x..y", ".JPEG.JPEG", "n1_1.JPEG"]
    (tmp_path / "train" / "cls.with.dots").mkdir(parents=True)
    for i, name in enumerate(names):
        (tmp_path / "train" / "cls.with.dots" / name).write_bytes(image_bytes(i))
    out, manifest = prep(tmp_path, train=str(tmp_path / "train"), shard_size=100)
    samples = read_back(out, "train")
    # ".JPEG.JPEG" is a hidden file: skipped by the scan like any dot-file, so six are found
    assert sorted(m["name"] for _, _, m in samples) == sorted(f"cls.with.dots/{n}" for n in names if n[0] != ".")
    keys = [k for k in wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False).to_tuple("__key__")]
    assert len(keys) == len(samples) and all("." not in k for (k,) in keys)


def test_bad_inputs_converted_or_skipped_and_recorded(tmp_path):
    cls = tmp_path / "train" / "n00000001"
    cls.mkdir(parents=True)
    good = image_bytes(0)
    (cls / "good.JPEG").write_bytes(good)
    (cls / "gray.JPEG").write_bytes(image_bytes(1, mode="L"))
    (cls / "cmyk.JPEG").write_bytes(image_bytes(2, mode="CMYK"))
    (cls / "png.JPEG").write_bytes(image_bytes(3, fmt="PNG"))
    (cls / "rgba.JPEG").write_bytes(image_bytes(4, mode="RGBA", fmt="PNG"))
    (cls / "truncated.JPEG").write_bytes(image_bytes(5, size=(200, 200))[:700])
    (cls / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(3000))
    (cls / "empty.JPEG").write_bytes(b"")
    (cls / "notes.txt").write_text("not an image")
    out, manifest = prep(tmp_path, train=str(tmp_path / "train"))

    split = manifest["splits"]["train"]
    assert split["found"] == 9 and split["written"] == 5 and split["skipped"] == 4 and split["converted"] == 4
    assert split["found"] == split["written"] + split["skipped"]
    reasons = {Path(s["name"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"truncated.JPEG", "corrupt.JPEG", "empty.JPEG", "notes.txt"}
    assert reasons["empty.JPEG"] == "empty file" and "not an image" in reasons["notes.txt"]
    assert "truncated" in reasons["truncated.JPEG"]
    for jpg, _, meta in read_back(out, "train"):
        image = Image.open(io.BytesIO(jpg))
        assert (image.format, image.mode) == ("JPEG", "RGB"), meta["name"]
        assert ("converted" in meta) == (meta["name"] != "n00000001/good.JPEG")


@pytest.mark.parametrize(
    "case",
    ["missing", "no_images", "empty_class", "no_classes", "labels_mismatch", "unknown_val_class", "damaged_tar",
     "inner_not_tar"],
)
def test_unusable_sources_stop_before_any_output(tmp_path, case):
    train = tmp_path / "train"
    kwargs = {"train": str(train)}
    if case == "missing":
        expected = str(train)
    elif case == "no_images":
        (train / "n1").mkdir(parents=True)
        expected = str(train)
    elif case == "empty_class":
        class_folders(train, {"n1": 2, "n3": 1})
        (train / "n2").mkdir()
        expected = str(train / "n2")
    elif case == "no_classes":
        train.mkdir()
        (train / "loose.JPEG").write_bytes(image_bytes(0))
        expected = str(train)
    elif case in ("labels_mismatch", "unknown_val_class"):
        class_folders(train, {"n1": 2})
        (tmp_path / "val").mkdir()
        (tmp_path / "val" / "v1.JPEG").write_bytes(image_bytes(0))
        (tmp_path / "val" / "v2.JPEG").write_bytes(image_bytes(1))
        label = "n1" if case == "labels_mismatch" else "n7"
        (tmp_path / "labels.txt").write_text(f"v1.JPEG {label}\n" + ("v3.JPEG n1\n" if case == "labels_mismatch" else "v2.JPEG n1\n"))
        kwargs.update(val=str(tmp_path / "val"), val_labels=str(tmp_path / "labels.txt"))
        expected = str(tmp_path / "val")
    elif case == "damaged_tar":
        ilsvrc_train_tar(tmp_path / "train.tar", {"n1": 3})
        data = (tmp_path / "train.tar").read_bytes()
        (tmp_path / "train.tar").write_bytes(data[:600] + b"\x00garbage" * 100)
        kwargs["train"] = expected = str(tmp_path / "train.tar")
    else:
        (tmp_path / "train.tar").write_bytes(tar_of({"n1.JPEG": image_bytes(0)}))
        kwargs["train"] = expected = str(tmp_path / "train.tar")
    with pytest.raises(SourceError) as error:
        prep(tmp_path, **kwargs)
    assert expected in str(error.value)
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_with_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "data_prep", "shards", "--train", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and f"error: {tmp_path / 'nope'}: training source not found" in result.stderr


def test_resize_shorter_never_upscales_and_keeps_small_originals(tmp_path):
    cls = tmp_path / "train" / "c"
    cls.mkdir(parents=True)
    small, big = image_bytes(0, size=(50, 40)), image_bytes(1, size=(300, 120))
    (cls / "small.JPEG").write_bytes(small)
    (cls / "big.JPEG").write_bytes(big)
    out, _ = prep(tmp_path, train=str(tmp_path / "train"), resize_shorter=60, quality=80)
    by_name = {m["name"]: (jpg, m) for jpg, _, m in read_back(out, "train")}
    assert by_name["c/small.JPEG"][0] == small
    resized = Image.open(io.BytesIO(by_name["c/big.JPEG"][0]))
    assert resized.size == (150, 60) and "resized" in by_name["c/big.JPEG"][1]["converted"]


def test_shard_size_by_bytes(tmp_path):
    files = class_folders(tmp_path / "train", {"a": 10, "b": 10})
    budget = 4 * max(len(d) for d in files.values())
    out, manifest = prep(tmp_path, train=str(tmp_path / "train"), shard_bytes=budget)
    shards = manifest["splits"]["train"]["shards"]
    assert sum(s["samples"] for s in shards) == 20
    assert len(shards) >= -(-sum(len(d) for d in files.values()) // budget)
    for shard in shards:
        names = [json.loads(m)["name"] for (m,) in wds.WebDataset(str(out / shard["name"]), shardshuffle=False).to_tuple("json")]
        assert sum(len(files[n]) for n in names) <= budget


def test_augmented_copies_form_one_shard_group_per_copy_and_resume(tmp_path, capsys):
    class_folders(tmp_path / "train", {"a": 3, "b": 3})
    class_folders(tmp_path / "val", {"a": 1, "b": 1})
    (tmp_path / "train" / "a" / "broken.JPEG").write_bytes(b"")  # skipped in every copy
    params = PrepParams(train=str(tmp_path / "train"), val=str(tmp_path / "val"), shard_size=4,
                        augment_copies=3, augment_size=32)
    out = tmp_path / "out"
    manifest = run(params, out)
    train = manifest["splits"]["train"]
    assert train["augment_copies"] == 3 and train["samples"] == 18
    assert (train["found"], train["written"], train["skipped"]) == (7, 6, 1) and len(manifest["skipped"]) == 1
    assert manifest["splits"]["val"]["augment_copies"] == 0 and manifest["parameters"]["augment_copies"] == 3
    # 7 sources in shards of 4: two shards per copy (4 + 3 planned), the groups consecutive runs
    assert [s["group"] for s in train["shards"]] == [0, 0, 1, 1, 2, 2]
    assert all("group" not in s for s in manifest["splits"]["val"]["shards"])
    samples = read_back(out, "train")
    groups = [s["group"] for s in train["shards"] for _ in range(s["samples"])]
    keys = [k for s in train["shards"]
            for (k,) in wds.WebDataset(str(out / s["name"]), shardshuffle=False).to_tuple("__key__")]
    assert len(set(keys)) == 18 and all(k.endswith(f"_copy{g}") for k, g in zip(keys, groups))
    assert all(meta["copy"] == g for (_, _, meta), g in zip(samples, groups))
    orders = [[m["name"] for (_, _, m), g in zip(samples, groups) if g == group] for group in range(3)]
    for names in orders:
        assert sorted(names) == sorted(f"{c}/{c}_{i}.JPEG" for c in "ab" for i in range(3))  # each source once
    assert len({tuple(names) for names in orders}) == 3  # each copy in its own shuffle
    copies: dict[str, list[bytes]] = {}
    for jpg, _, meta in samples:
        assert Image.open(io.BytesIO(jpg)).size == (32, 32)
        copies.setdefault(meta["name"], []).append(jpg)
    assert all(len(v) == 3 and len(set(v)) == 3 for v in copies.values())  # independent draws
    assert all(Image.open(io.BytesIO(j)).size != (32, 32) for j, _, _ in read_back(out, "val"))

    # A shard of the middle group lost: a re-run writes only that one, and the same bytes.
    before = (out / "manifest.json").read_bytes()
    lost = train["shards"][3]["name"]
    (out / lost).unlink()
    (out / manifest_mod.PARTS_DIR / f"{lost}.json").unlink()
    (out / "manifest.json").unlink()
    capsys.readouterr()
    run(params, out)
    assert "7 shards planned, 7 for task 0/1, 6 already complete; writing 1 (3 samples)" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, **kwargs)


@pytest.mark.slow
def test_array_tasks_plus_finalize_equal_a_single_run(tmp_path):
    class_folders(tmp_path / "train", {"a": 9, "b": 8, "c": 7})
    class_folders(tmp_path / "val", {"a": 2, "b": 2, "c": 2})
    common = ["shards", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--shard-size", "3"]
    assert _cli(*common, "--out", str(tmp_path / "single"), "--workers", "2").returncode == 0
    for task in range(3):
        r = _cli(*common, "--out", str(tmp_path / "array"), "--num-tasks", "3", "--task-id", str(task))
        assert r.returncode == 0, r.stderr
        assert not (tmp_path / "array" / "manifest.json").exists()
    early = _cli("finalize", str(tmp_path / "array"))
    assert early.returncode == 0, early.stderr
    assert (tmp_path / "single" / "manifest.json").read_bytes() == (tmp_path / "array" / "manifest.json").read_bytes()


@pytest.mark.slow
def test_finalize_names_missing_shards(tmp_path):
    class_folders(tmp_path / "train", {"a": 6})
    common = ["shards", "--train", str(tmp_path / "train"), "--shard-size", "2", "--out", str(tmp_path / "o")]
    assert _cli(*common, "--num-tasks", "2", "--task-id", "0").returncode == 0
    result = _cli("finalize", str(tmp_path / "o"))
    assert result.returncode == 2 and "1 of 3 shards are not complete (first: train-000001.tar)" in result.stderr


@pytest.mark.slow
def test_resume_after_kill_mid_run(tmp_path):
    class_folders(tmp_path / "train", {"a": 60, "b": 60})
    command = [sys.executable, "-m", "data_prep", "shards", "--train", str(tmp_path / "train"), "--shard-size", "4"]
    reference = subprocess.run(command + ["--out", str(tmp_path / "ref"), "--workers", "1"], capture_output=True)
    assert reference.returncode == 0

    out = tmp_path / "out"
    # A throttled run (every file read sleeps) so the kill lands mid-shard.
    slow = "import time, data_prep.sources as s; r = s.SampleRef.read; s.SampleRef.read = lambda self: (time.sleep(0.01), r(self))[1]\n"
    slow += "import sys; from data_prep.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", slow, *command[3:], "--out", str(out), "--workers", "2"],
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / ".parts").glob("*.json"))) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(["pkill", "-9", "-f", str(out)], check=False)  # the pool's orphaned workers
    time.sleep(0.5)
    done = len(list((out / ".parts").glob("*.json")))
    assert 5 <= done < 30 and not (out / "manifest.json").exists()
    tars = {p.name for p in out.glob("train-*.tar")}
    assert len(tars) >= done  # finished shards, perhaps one renamed just before its record

    resumed = subprocess.run(command + ["--out", str(out), "--workers", "2"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done} already complete" in resumed.stderr
    assert not list(out.glob("*.tmp*")) and not list((out / ".parts").glob("*.tmp*"))
    assert (out / "manifest.json").read_bytes() == (tmp_path / "ref" / "manifest.json").read_bytes()


def test_temporary_files_of_a_killed_run_are_removed(tmp_path):
    """A kill can land while a shard, its index or its record is being written: their temporary
    files are removed when the shard is written again (the kill test above hits them only by chance)."""
    class_folders(tmp_path / "train", {"a": 3, "b": 3})
    out, _ = prep(tmp_path, train=str(tmp_path / "train"))
    # As a kill before shard 0's record leaves it: no record, no manifest, temporary files.
    (out / "manifest.json").unlink()
    records = sorted((out / ".parts").glob("*.json"))
    record = next(p for p in records if "train-000000" in json.loads(p.read_text()).get("name", ""))
    record.unlink()
    stale = [out / "train-000000.tar.tmp123", out / "train-000000.tar.idx.tmp456",
             out / ".parts" / "train-000000.tar.json.tmp789"]
    for path in stale:
        path.write_bytes(b"partial")
    prep(tmp_path, train=str(tmp_path / "train"))
    assert not any(path.exists() for path in stale) and (out / "train-000000.tar.idx").is_file()


def test_rerun_with_other_parameters_is_refused(tmp_path):
    class_folders(tmp_path / "train", {"a": 4})
    prep(tmp_path, train=str(tmp_path / "train"))
    with pytest.raises(manifest_mod.PrepError, match="parameters differ: seed"):
        prep(tmp_path, train=str(tmp_path / "train"), seed=9)


@pytest.mark.slow
def test_verify_accepts_good_shards_and_names_damage(tmp_path):
    class_folders(tmp_path / "train", {"a": 5, "b": 5})
    out, manifest = prep(tmp_path, train=str(tmp_path / "train"))
    ok = _cli("verify", str(out))
    assert ok.returncode == 0 and "10 samples OK" in ok.stdout
    shard = out / manifest["splits"]["train"]["shards"][1]["name"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # inside the first image's bytes
    shard.write_bytes(bytes(data))
    (out / manifest["splits"]["train"]["shards"][2]["name"]).unlink()
    bad = _cli("verify", str(out), "--workers", "2")
    assert bad.returncode == 1
    assert f"{shard}: sha256 differs from the manifest" in bad.stderr
    assert "train-000002.tar: missing" in bad.stderr


# Just over Pillow's default limit (89,478,485 pixels), which warns about it; a flat colour
# keeps making and decoding it fast.
BIG = (12000, 7500)
DOWNSCALED = "downscaled from 12000x7500: over 89478485 pixels, the most a default Pillow reads"


def flat_jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 120, 40)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.slow
def test_oversized_image_is_stored_at_a_size_the_loader_reads(tmp_path):
    class_folders(tmp_path / "train", {"a": 2, "b": 2})
    (tmp_path / "train" / "a" / "huge.JPEG").write_bytes(flat_jpeg(BIG))
    # resize_shorter alone would leave it at 11984x7490, still over the limit: the smaller size wins
    out, manifest = prep(tmp_path, train=str(tmp_path / "train"), resize_shorter=7490)
    assert Image.MAX_IMAGE_PIXELS == encode.MAX_STORED_PIXELS == 89_478_485  # preparing left the default

    split = manifest["splits"]["train"]
    assert (split["written"], split["skipped"], split["converted"]) == (5, 0, 1)
    by_name = {m["name"]: (jpg, m) for jpg, _, m in read_back(out, "train")}
    jpg, meta = by_name["a/huge.JPEG"]
    assert meta["converted"] == DOWNSCALED
    width, height = Image.open(io.BytesIO(jpg)).size
    assert 0.999 * encode.MAX_STORED_PIXELS < width * height <= encode.MAX_STORED_PIXELS
    assert abs(width / height - BIG[0] / BIG[1]) < 1 / height  # aspect ratio kept to the pixel
    assert all("converted" not in m for n, (_, m) in by_name.items() if n != "a/huge.JPEG")

    # Plain webdataset decoding, with Pillow's default limit: no DecompressionBombWarning.
    urls = [str(out / s["name"]) for s in split["shards"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", ResourceWarning)  # webdataset leaves its files to the GC
        sizes = [im.size for im, in wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg")]
    assert len(sizes) == 5 and (width, height) in sizes
    assert verify.verify(out) == []

    # Baked augmented copies decode the source itself: within the input limit, not refused.
    baked = run(PrepParams(train=str(tmp_path / "train"), augment_copies=1, augment_size=32), tmp_path / "baked")
    assert baked["splits"]["train"]["written"] == 5 and baked["skipped"] == []


def test_resize_shorter_below_the_limit_is_a_plain_resize():
    result = encode.encode(flat_jpeg(BIG), encode.EncodeSpec(resize_shorter=3000))
    assert (result.width, result.height, result.converted) == (4800, 3000, "resized from 12000x7500")


def test_input_over_the_input_limit_is_skipped_with_its_size(tmp_path):
    class_folders(tmp_path / "train", {"a": 2})
    Image.new("1", (25000, 20000)).save(tmp_path / "train" / "a" / "bomb.png")  # 500 MP in ~60 KB
    reason = "decompression bomb: 25000x20000 pixels, over the 400000000 pixel limit for inputs"
    for copies in (0, 1):  # encode() and the baked copies' decoding refuse it alike
        manifest = run(PrepParams(train=str(tmp_path / "train"), augment_copies=copies), tmp_path / f"out{copies}")
        split = manifest["splits"]["train"]
        assert (split["found"], split["written"], split["skipped"]) == (3, 2, 1)
        assert manifest["skipped"] == [{"split": "train", "name": "a/bomb.png", "reason": reason}]


def test_verify_names_a_stored_image_over_the_loader_limit(tmp_path):
    class_folders(tmp_path / "train", {"a": 3})
    out, manifest = prep(tmp_path, train=str(tmp_path / "train"))
    shard = out / manifest["splits"]["train"]["shards"][0]["name"]
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    key = members[0][0].split(".")[0]
    # The shard as an older preparation wrote it: the oversized original stored unchanged.
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            data = flat_jpeg(BIG) if name == f"{key}.jpg" else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = _cli("verify", str(out))
    assert result.returncode == 1
    assert (f"{shard}: sample {key} is 12000x7500, over the 89478485 pixels the loader reads; "
            "prepare the shards again") in result.stderr
    assert f"{shard}: sha256 differs from the manifest" in result.stderr  # the other checks still run


def test_data_prep_leaves_pillows_default_limit():
    code = ("from PIL import Image; default = Image.MAX_IMAGE_PIXELS; "
            "import data_prep.encode, data_prep.writer, data_prep.verify; "
            "print(default, Image.MAX_IMAGE_PIXELS, data_prep.encode.MAX_STORED_PIXELS)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["89478485"] * 3
    with pytest.raises(encode.BadImage, match="truncated"):  # a failure inside the raised limit restores it
        encode.open_image(image_bytes(5, size=(200, 200))[:700])
    assert Image.MAX_IMAGE_PIXELS == 89_478_485

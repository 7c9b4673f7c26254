import argparse
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import synthetic
from data_prep.synthetic import DESIGNS, SyntheticSpec, generate, render

SPEC = SyntheticSpec(num_classes=3, train_per_class=6, val_per_class=6, seed=7)


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "out"
    summary = generate(root, SPEC, workers=1)
    return root, summary


def test_layout_and_names(out):
    root, summary = out
    assert summary["generated"] is True
    assert summary["counts"] == {"train": 18, "val": 18}
    wnids = [w for w, _ in summary["classes"]]
    assert [n for _, n in summary["classes"]] == list(DESIGNS[:3])
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids) and len(set(wnids)) == 3
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(wnids)
    for w in wnids:
        names = sorted(p.name for p in (root / "train" / w).iterdir())
        assert names == sorted(f"{w}_{n}.JPEG" for n in range(1, 7))
    val_names = sorted(p.name for p in (root / "val").iterdir())
    assert val_names == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 19)]
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["train", "val", "val_labels.txt", "LOC_synset_mapping.txt", "synthetic.json"])
    assert json.loads((root / "synthetic.json").read_text())["spec"]["seed"] == 7


def test_label_files(out):
    root, summary = out
    wnids = [w for w, _ in summary["classes"]]
    rows = [line.split() for line in (root / "val_labels.txt").read_text().splitlines()]
    assert all(len(r) == 2 for r in rows)
    assert [r[0] for r in rows] == sorted(p.name for p in (root / "val").iterdir())
    labels = [r[1] for r in rows]
    assert sorted(set(labels)) == sorted(wnids)
    assert all(labels.count(w) == 6 for w in wnids)
    assert labels != sorted(labels)  # interleaved, not grouped
    mapping = [line.split(" ", 1) for line in (root / "LOC_synset_mapping.txt").read_text().splitlines()]
    assert mapping == [[w, n] for w, n in summary["classes"]]
    assert [w for w, _ in mapping] == sorted(w for w, _ in mapping)


def test_jpeg_rgb_varied_sizes(out):
    root, _ = out
    sizes = []
    for p in sorted(root.rglob("*.JPEG")):
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            im.load()
            w, h = im.size
        assert SPEC.min_side <= min(w, h) and max(w, h) <= SPEC.max_side
        sizes.append((w, h))
    assert len(sizes) == 36
    aspects = [w / h for w, h in sizes]
    assert len(set(sizes)) > 20
    assert min(aspects) < 0.85 and max(aspects) > 1.2


def test_deterministic_across_runs_and_workers(out, tmp_path):
    root, _ = out
    generate(tmp_path / "w2", SPEC, workers=2)
    assert _files(tmp_path / "w2") == _files(root)
    generate(tmp_path / "w1", SPEC, workers=1)
    assert _files(tmp_path / "w1") == _files(root)
    generate(tmp_path / "other", SyntheticSpec(num_classes=3, train_per_class=6, val_per_class=6, seed=8))
    other = _files(tmp_path / "other")
    assert other.keys() == _files(root).keys()
    assert sum(other[k] != v for k, v in _files(root).items() if k.endswith(".JPEG")) == 36


def test_rerun_is_noop(out):
    root, _ = out
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    summary = generate(root, SPEC, workers=2)
    assert summary["generated"] is False
    assert summary["counts"] == {"train": 18, "val": 18} and len(summary["classes"]) == 3
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_refuses_foreign_or_mismatched_directory(out, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=re.escape(str(foreign))):
        generate(foreign, SPEC)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    root, _ = out
    with pytest.raises(ValueError, match=re.escape(str(root))):
        generate(root, SyntheticSpec(num_classes=3, train_per_class=6, val_per_class=6, seed=8))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate(empty, SyntheticSpec(num_classes=2, train_per_class=1, val_per_class=1))["generated"]


@pytest.mark.parametrize("kw", [{"num_classes": 1}, {"num_classes": len(DESIGNS) + 1},
                                {"train_per_class": 0}, {"min_side": 100, "max_side": 90}])
def test_invalid_spec(kw, tmp_path):
    with pytest.raises(ValueError):
        generate(tmp_path / "x", SyntheticSpec(**kw))
    assert not (tmp_path / "x").exists()


def test_all_designs_render():
    spec = SyntheticSpec(num_classes=len(DESIGNS))
    assert len(DESIGNS) >= 12 and len(set(DESIGNS)) == len(DESIGNS)
    for c in range(len(DESIGNS)):
        a = np.asarray(render(spec, 0, c, 1), dtype=np.float32)
        assert a.ndim == 3 and a.shape[2] == 3 and a.std() > 5  # an object is visible


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    synthetic.add_cli(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["synthetic", str(tmp_path / "cli"), "--num-classes", "2",
                              "--train-per-class", "2", "--val-per-class", "3", "--seed", "5",
                              "--workers", "1"])
    assert args.func(args) in (0, None)
    line = capsys.readouterr().out.strip()
    assert "4 train" in line and "6 val" in line and "\n" not in line
    meta = json.loads((tmp_path / "cli" / "synthetic.json").read_text())
    assert meta["spec"]["seed"] == 5 and meta["counts"] == {"train": 4, "val": 6}
    assert len(list((tmp_path / "cli" / "val").iterdir())) == 6


def _dataset(spec, per_class, split):
    xs, ys = [], []
    for c in range(spec.num_classes):
        for i in range(1, per_class + 1):
            xs.append(render(spec, split, c, i))
            ys.append(c)
    return xs, np.array(ys)


def _nearest_centroid(xtr, ytr, xte, yte):
    cents = np.stack([xtr[ytr == c].mean(0) for c in np.unique(ytr)])
    pred = ((xte[:, None, :] - cents[None]) ** 2).sum(-1).argmin(1)
    return float((pred == yte).mean())


def _hue_histogram(image: Image.Image, bins: int = 12) -> np.ndarray:
    """Where the crop's colours lie around the colour wheel, weighted by how vivid they are."""
    hsv = np.asarray(image.convert("HSV"), np.float32).reshape(-1, 3)
    weight = hsv[:, 1] * hsv[:, 2]
    histogram = np.bincount((hsv[:, 0] * bins / 256).astype(int), weights=weight, minlength=bins)
    return histogram / max(histogram.sum(), 1e-6)


def test_smallest_crops_keep_the_class():
    """The paper's smallest crops (8% of the area, 3:4-4:3, at the demo's 32 px) keep evidence
    of the class, as crops of a real object's photo do: here its colour, read by a nearest
    centroid of hue histograms, from crops of other images than the ones it learnt from."""
    from imaging.crops import random_resized_crop
    from imaging.specs import CropSpec

    spec = SyntheticSpec(num_classes=10, seed=4)
    smallest = CropSpec(area=(0.08, 0.08))
    rng = random.Random(0)

    def crops(split, per_class, per_image):
        images, labels = _dataset(spec, per_class, split)
        feats = [_hue_histogram(random_resized_crop(im, 32, smallest, rng)) for im in images for _ in range(per_image)]
        return np.stack(feats), np.repeat(labels, per_image)

    accuracy = _nearest_centroid(*crops(0, 20, 3), *crops(1, 12, 2))
    assert accuracy > 0.3, accuracy  # chance is 0.1


@pytest.mark.slow
def test_shapes_are_learnable():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small model: one thread is as fast and immune to oversubscription
    spec = SyntheticSpec(num_classes=10, seed=1)
    n = 32

    def tensor(ims):
        g = np.stack([np.asarray(im.convert("L").resize((n, n), Image.BILINEAR), np.float32) for im in ims])
        g = (g - g.mean((1, 2), keepdims=True)) / (g.std((1, 2), keepdims=True) + 1e-3)
        return torch.from_numpy(g[:, None])

    tr, ytr = _dataset(spec, 48, 0)
    te, yte = _dataset(spec, 20, 1)
    xtr, xte = tensor(tr), tensor(te)
    xtr = torch.cat([xtr, xtr.flip(3)])  # a flip keeps every class's identity
    ytr = torch.from_numpy(np.concatenate([ytr] * 2))
    nn = torch.nn
    block = lambda i, o: [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]  # noqa: E731
    model = nn.Sequential(*block(1, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2),
                          *block(32, 64), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(10):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            b = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(xtr[b]), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(1).numpy() == yte).mean())
    torch.set_num_threads(threads)
    assert acc > 0.5, acc  # chance is 0.1


def test_demo_data_of_an_earlier_version_is_refused_with_what_to_do(tmp_path):
    """A demo_data/ prepared by an earlier generator is not trained on silently: one line names
    the folder, the versions, and the remedy. The current version's is reused as it is."""
    from data_prep.demo import ensure_demo
    from shards.manifest import MANIFEST, PrepError

    def prepared(root, version):
        (root / "images").mkdir(parents=True)
        (root / "images" / "synthetic.json").write_text(json.dumps({"generator": "data_prep.synthetic",
                                                                    "version": version}))
        (root / "shards").mkdir()
        (root / "shards" / MANIFEST).write_text("{}")
        return root

    old = prepared(tmp_path / "old", synthetic.VERSION - 1)
    with pytest.raises(PrepError) as refused:
        ensure_demo(old)
    message = str(refused.value)
    assert str(old) in message and f"version {synthetic.VERSION - 1}" in message and "remove" in message
    assert "\n" not in message
    current = prepared(tmp_path / "current", synthetic.VERSION)
    assert ensure_demo(current) == current / "shards"

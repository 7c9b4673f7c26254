"""Small real image files (and archives of them) for the data-preparation tests."""
from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, size=(40, 30), mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def class_folders(root: Path, classes: dict[str, int], seed: int = 0) -> dict[str, bytes]:
    """``root/<class>/<class>_<i>.JPEG`` with varied sizes; returns relative name -> bytes."""
    rng = random.Random(seed)
    written = {}
    for cls, count in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            data = image_bytes(rng.randrange(1 << 30), (rng.randint(24, 64), rng.randint(24, 64)))
            name = f"{cls}/{cls}_{i}.JPEG"
            (root / name).write_bytes(data)
            written[name] = data
    return written


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            add_bytes(tar, name, data)
    return buffer.getvalue()


def ilsvrc_train_tar(path: Path, classes: dict[str, int], seed: int = 0) -> dict[str, bytes]:
    """The layout of ``ILSVRC2012_img_train.tar``: a tar of ``<wnid>.tar``, each holding
    ``<wnid>_<n>.JPEG``. Returns ``wnid/file`` -> bytes."""
    rng = random.Random(seed)
    everything, inner = {}, {}
    for wnid, count in classes.items():
        files = {f"{wnid}_{i}.JPEG": image_bytes(rng.randrange(1 << 30)) for i in range(count)}
        inner[f"{wnid}.tar"] = tar_of(files)
        everything.update({f"{wnid}/{n}": d for n, d in files.items()})
    path.write_bytes(tar_of(inner))
    return everything


def devkit_archive(path: Path, wnids: list[str], val_wnids: list[str]) -> None:
    """A devkit with the structure of ``ILSVRC2012_devkit_t12.tar.gz``: ``data/meta.mat`` (leaf
    synsets plus one non-leaf, as the real one has) and the 1-based validation ground truth."""
    import scipy.io

    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
             ("num_children", "O"), ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    rows = [(i + 1, w, f"name of {w}, alias", "gloss", 0, np.array([]), 0, 10) for i, w in enumerate(wnids)]
    rows.append((len(wnids) + 1, "n99999999", "an inner node", "gloss", 2, np.array([1, 2]), 1, 0))
    synsets = np.array(rows, dtype=dtype)
    meta = io.BytesIO()
    scipy.io.savemat(meta, {"synsets": synsets})
    ids = {w: i + 1 for i, w in enumerate(wnids)}
    truth = "".join(f"{ids[w]}\n" for w in val_wnids).encode()
    with tarfile.open(path, "w:gz") as tar:
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)

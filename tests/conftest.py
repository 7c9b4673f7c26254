import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # the tests' own helpers (imagefiles, ...)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small prepared dataset in the demo's layout: 4 classes, 96 training images in shards
    of 5 (the last holds 1) and 16 validation images in uneven shards (5, 5, 5, 1), so that
    equal batch counts per rank and exact validation counting are really exercised."""
    from data_prep.plan import PrepParams
    from data_prep.synthetic import SyntheticSpec, generate
    from data_prep.writer import run

    root = tmp_path_factory.mktemp("tiny")
    generate(root / "images", SyntheticSpec(num_classes=4, train_per_class=24, val_per_class=4, min_side=40, max_side=72, seed=1))
    images = root / "images"
    params = PrepParams(
        train=str(images / "train"), val=str(images / "val"), val_labels=str(images / "val_labels.txt"),
        class_names=str(images / "LOC_synset_mapping.txt"), shard_size=5,
    )
    run(params, root / "shards")
    return root / "shards"


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env

import os
import subprocess
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


@pytest.fixture(scope="session")
def baked_data(tmp_path_factory) -> Path:
    """32 good source images and a corrupt one, baked into 3 copies each, in shards of 5."""
    from data_prep.plan import PrepParams
    from data_prep.synthetic import SyntheticSpec, generate
    from data_prep.writer import run

    root = tmp_path_factory.mktemp("baked")
    images = root / "images"
    generate(images, SyntheticSpec(num_classes=4, train_per_class=8, val_per_class=1, min_side=40, max_side=72, seed=2))
    first_class = sorted((images / "train").iterdir())[0]
    (first_class / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    params = PrepParams(
        train=str(images / "train"), val=str(images / "val"), val_labels=str(images / "val_labels.txt"),
        shard_size=5, augment_copies=3, augment_size=32,
    )
    manifest = run(params, root / "shards")
    assert manifest["splits"]["train"]["skipped"] == 1 and manifest["splits"]["train"]["samples"] == 3 * 32
    return root / "shards"


@pytest.fixture(scope="session")
def inference_runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """Three tiny trained runs (2 steps each), trained together, for the tests of prediction,
    export and the hub: the paper's GoogLeNet, googlenet_bn with EMA, and AlexNet at 64 px. The
    tests read them and write only under their ``export/``."""
    from tiny_runs import train_together  # tiny_runs imports this module

    return train_together(tiny_data, tmp_path_factory.mktemp("inference-runs"), {
        "googlenet": ["model.name=googlenet", "train.max_steps=2"],
        "googlenet_bn": ["model.name=googlenet_bn", "ema.enabled=true", "train.max_steps=2"],
        "alexnet": ["model.name=alexnet", "data.image_size=64", "train.max_steps=2"],
    })


@pytest.fixture(scope="session")
def gpu_report_smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One smoke run of the GPU report (every step at tiny sizes on the CPU) and its folder: its
    own test reads the report, the training benchmark's test the table of its bench_train step."""
    out = tmp_path_factory.mktemp("gpu-report")
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_report", "--smoke", "--out", str(out)], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=7200)
    return result, out


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)``: a real small disk of that size ("2m", "400m"), unmounted after the test
    (the tests run as root; tmpfs takes memory only for what is written); skipped where mounting
    is not allowed."""
    mounts = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk-{len(mounts)}"
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def region_decoder(tmp_path_factory):
    """The region decoder, built into a temporary directory when it is not built in the tree;
    skipped where there is no C compiler or libjpeg-turbo headers."""
    import subprocess

    from imaging import jpeg_region

    saved = jpeg_region.LIBRARY if jpeg_region.available() else None
    if saved is None:
        target = tmp_path_factory.mktemp("jpeg_region") / "libjpeg_region.so"
        try:
            jpeg_region.build(target)
        except (OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"cannot build the region decoder here: {exc}")
        assert jpeg_region.use_library(target)
    yield
    jpeg_region.use_library(saved)


def pytest_collection_modifyitems(config, items):
    """Every test not marked ``slow`` is in the everyday subset: ``pytest -m fast``."""
    for item in items:
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 as a real server on 127.0.0.1 (an ``object_store.S3Server``), shared by the
    session: IAM authentication on, ``access_key``/``secret_key`` valid, ``env()`` for child
    processes. Use bucket names of your own; do not ``stop()`` it (start an ``S3Server()`` of
    your own for an outage). Skipped without moto's server extras."""
    import importlib.util

    missing = [m for m in ("moto", "flask", "boto3") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"moto in server mode needs {', '.join(missing)}: pip install 'moto[server]'")
    from object_store import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3_server")).start()
    yield server
    server.close()


@pytest.fixture
def http_server_factory(tmp_path_factory):
    """``start(directory, **kwargs) -> object_store.RangeHTTPServer``, started on a free port
    (kwargs: ``port``, ``chunk_delay``, ``log_path``); every one is killed at teardown."""
    from object_store import RangeHTTPServer

    servers = []
    logs = tmp_path_factory.mktemp("http_server")

    def start(directory, **kwargs) -> RangeHTTPServer:
        kwargs.setdefault("log_path", logs / f"requests-{len(servers)}.log")
        server = RangeHTTPServer(directory, **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.close()

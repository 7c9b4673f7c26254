"""Shards in object storage, against real servers on 127.0.0.1: moto's S3 (IAM authentication
on) and a range-capable HTTP server. Preparation uploads (manifest last) and resumes; the
loader starts with two reads and reads each lane's shard range in few ranged reads, sample for
sample what the local shards give; the cache is filled, reused and invalidated; wrong
credentials, a missing bucket or manifest are one line each; a store that goes down is retried,
and when it stays down the run stops with one line and resumes exactly."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, subprocess_env
from object_store import free_port
from test_faults import error_lines, kill_tree, same_weights, steps_saved, wait_for
from test_train import TINY, launch, launch_command

from data_prep.plan import PrepParams
from data_prep.synthetic import SyntheticSpec, generate
from data_prep.transfer import RemoteOutput
from data_prep.verify import verify
from data_prep.writer import run as prepare
from pipeline.data.prepared import RemoteOptions, Sample, open_prepared, shard_range
from pipeline.data.webdataset_input import TrainStream
from shards import remote as remote_module
from shards.dataset_index import DatasetIndex
from shards.manifest import PrepError, sha256_file
from shards.remote import plan_reads
from shards.store import Store, StoreError, StoreUnavailable
from shards.tar_index import load_index

ARGS = [*TINY, "schedule.epochs=2", "data.workers=2", "train.checkpoint_every_steps=5", "train.log_every_steps=1"]
ONE = [*ARGS, "schedule.epochs=1", "data.workers=1"]  # one process: 24 updates


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store-images")
    generate(root, SyntheticSpec(num_classes=4, train_per_class=12, val_per_class=3, min_side=40, max_side=72, seed=3))
    return root


def params_for(images: Path) -> PrepParams:
    return PrepParams(train=str(images / "train"), val=str(images / "val"), val_labels=str(images / "val_labels.txt"),
                      class_names=str(images / "LOC_synset_mapping.txt"), shard_size=5)


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


def samples(shards, num_classes) -> list[tuple]:
    out = []
    for shard in shards:
        for item in shard_range(shard, 0, shard.samples, num_classes):
            assert isinstance(item, Sample), item
            out.append((item.key, item.data, item.label, item.index))
    return out


def lane_keys(data, lanes: int = 2) -> list[list[str]]:
    stream = TrainStream(data.train, batch_size=4, batches_per_epoch=data.train_samples // 8, rank=0, world_size=2,
                         seed=5, image_size=32, crop=None, baked=False, shuffle_buffer=6, eval_resize=36,
                         num_classes=data.num_classes)
    return [[item.key for item in stream.lane_samples(lane, lanes, epoch=1)] for lane in range(lanes)]


# --------------------------------------------------------------------------------------------- S3
def test_prepared_into_s3_reads_sample_for_sample_as_on_local_disk(aws_env, images, tmp_path):
    """Upload order (manifest last) and the manifest equal to a local preparation's; start-up
    reads two objects; every sample and every lane's order the same as from local disk."""
    aws_env.make_bucket("prep")
    local = tmp_path / "local"
    manifest = prepare(params_for(images), local)
    uploaded = prepare(params_for(images), "s3://prep/tiny", stage=tmp_path / "stage")
    assert uploaded == manifest
    keys = aws_env.list_keys("prep", "tiny/")
    shards = [s["name"] for split in manifest["splits"].values() for s in split["shards"]]
    assert {f"tiny/{n}" for n in shards} | {f"tiny/{n}.idx" for n in shards} | {"tiny/manifest.json", "tiny/index.npz"} \
        <= set(keys)
    assert not list((tmp_path / "stage").glob("*.tar"))  # staged copies freed once uploaded
    log = [line for line in aws_env.requests() if "/prep/tiny/" in line and line.startswith("PUT")]
    assert "manifest.json" in log[-1]  # written last: a reader never sees a half-written dataset

    data = open_prepared("s3://prep/tiny", RemoteOptions(retry_s=5))
    assert data.remote.store.stats.requests == 2  # the manifest and index.npz, nothing per shard
    reference = open_prepared(local)
    assert samples(data.train, 4) == samples(reference.train, 4)
    assert samples(data.val, 4) == samples(reference.val, 4)
    assert lane_keys(data) == lane_keys(reference)
    assert data.remote.store.stats.requests > 2  # really read from the store


def test_an_interrupted_upload_resumes_with_what_is_missing(aws_env, images, tmp_path):
    """kill -9 of the preparation after its first shards are in the store; the same command
    writes only the rest, and the manifest is that of an uninterrupted preparation."""
    aws_env.make_bucket("resume")
    command = [sys.executable, "-m", "data_prep", "shards", "--train", str(images / "train"), "--val",
               str(images / "val"), "--val-labels", str(images / "val_labels.txt"), "--class-names",
               str(images / "LOC_synset_mapping.txt"), "--shard-size", "5", "--workers", "1",
               "--out", "s3://resume/ds", "--stage", str(tmp_path / "stage")]
    env = {**subprocess_env(), **aws_env.env()}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: len([k for k in aws_env.list_keys("resume", "ds/.parts/")]) >= 2 or proc.poll() is not None,
             timeout=120, what="two uploaded shards")
    kill_tree(proc)
    proc.wait()
    assert "ds/manifest.json" not in aws_env.list_keys("resume", "ds/")
    done = len(aws_env.list_keys("resume", "ds/.parts/"))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{done} already complete" in result.stderr
    manifest = json.loads(aws_env.client().get_object(Bucket="resume", Key="ds/manifest.json")["Body"].read())
    assert manifest == prepare(params_for(images), tmp_path / "local")


def test_finalize_never_publishes_a_shard_whose_upload_failed(aws_env, images, tmp_path):
    """A shard written to the stage whose upload did not finish (its record is not in the store):
    a finalize by hand refuses, naming it, instead of publishing a manifest that lists it."""
    aws_env.make_bucket("half")
    prepare(params_for(images), "s3://half/ds", stage=tmp_path / "stage")
    client = aws_env.client()
    client.delete_object(Bucket="half", Key="ds/manifest.json")
    client.delete_object(Bucket="half", Key="ds/.parts/train-000001.tar.json")
    with pytest.raises(PrepError, match="1 of .* shards are not complete .*train-000001.tar"):
        RemoteOutput("s3://half/ds", tmp_path / "stage").finalize()
    assert "ds/manifest.json" not in aws_env.list_keys("half", "ds/")
    with pytest.raises(PrepError, match="read-only"):
        RemoteOutput("https://example.org/ds")


@pytest.mark.slow
def test_wrong_credentials_missing_bucket_and_missing_manifest_are_one_line_each(s3_server, tmp_path):
    s3_server.make_bucket("creds")
    s3_server.client().put_object(Bucket="creds", Key="other/x", Body=b"x")
    cases = [
        (s3_server.env(secret_key="not-the-secret"), "s3://creds/tiny", "access denied"),
        (s3_server.env(access_key="AKIDUNKNOWN00000000"), "s3://creds/tiny", "access denied"),
        (s3_server.env(), "s3://no-such-bucket/tiny", "s3://no-such-bucket: the bucket does not exist"),
        (s3_server.env(), "s3://creds/tiny", "s3://creds/tiny/manifest.json: no manifest"),
    ]

    def train(case: int) -> subprocess.CompletedProcess:
        env, url, _ = cases[case]
        return subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, f"data.dir={url}",
                               f"output_dir={tmp_path}", f"name=creds-{case}"], cwd=tmp_path,
                              env={**subprocess_env(), **env}, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(len(cases)) as pool:  # each fails while starting up: all at once
        results = list(pool.map(train, range(len(cases))))
    for (_, _, expected), result in zip(cases, results):
        lines = error_lines(result.stderr)
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "not-the-secret" not in result.stderr
        assert s3_server.secret_key not in result.stderr
    # the preparation refuses before any work, too
    result = subprocess.run([sys.executable, "-m", "data_prep", "verify", "s3://creds/tiny"], cwd=ROOT,
                            env={**subprocess_env(), **s3_server.env(secret_key="wrong")}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "access denied" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_processes_from_s3_killed_and_resumed_end_as_on_local_disk(aws_env, tiny_data, tmp_path):
    """The same 2-process run from local disk and from the store (through a cache the processes
    share), the latter kill -9'ed after a checkpoint and resumed: the same final weights, the
    cache complete and sound. Then verify reads every shard back."""
    aws_env.make_bucket("train")
    aws_env.upload_dir(tiny_data, "train", "tiny")
    launch(2, *ARGS, f"data.dir={tiny_data}", f"output_dir={tmp_path}", "name=local", cwd=tmp_path)
    cache = tmp_path / "cache"  # shared by both ranks and their loader workers
    args = [*ARGS, "data.dir=s3://train/tiny", f"data.cache_dir={cache}", f"output_dir={tmp_path}", "name=s3"]
    env = {**subprocess_env(), **aws_env.env()}
    proc = subprocess.Popen(launch_command(2, *args), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: steps_saved(tmp_path / "s3") or proc.poll() is not None, what="a checkpoint")
    kill_tree(proc)
    proc.wait()
    result = subprocess.run(launch_command(2, *args), cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shards stream from s3://train/tiny: index.npz" in result.stderr
    same_weights(tmp_path / "local", tmp_path / "s3")
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    shas = {s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}
    cached = {p.stem: p for p in cache.glob("*.tar")}
    assert set(cached) == shas and not list(cache.glob("*.tmp*"))  # every shard once, none half-written
    assert all(sha256_file(path) == sha for sha, path in cached.items())
    for path in (tmp_path / "s3").rglob("*"):  # no credentials in configs, logs or checkpoints
        assert not path.is_file() or aws_env.secret_key.encode() not in path.read_bytes(), path
    verify = subprocess.run([sys.executable, "-m", "data_prep", "verify", "s3://train/tiny"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0 and "samples OK in s3://train/tiny" in verify.stdout, verify.stderr[-2000:]


# ------------------------------------------------------------------------------------------- HTTP
def test_each_lane_reads_its_shard_range_in_few_ranged_requests(tiny_data, http_server_factory, monkeypatch):
    server = http_server_factory(tiny_data)
    data = open_prepared(server.url, RemoteOptions(retry_s=5))
    assert server.requests() == ["GET /manifest.json -", "GET /index.npz -"]
    server.clear_log()
    shard = data.train[1]
    entries = data.remote.entries(shard.name)
    chunk = 16 * (entries[3].offset - entries[1].offset)  # the first read: two samples, then growing
    monkeypatch.setattr(data.remote, "chunk_bytes", chunk)
    items = list(shard_range(shard, 1, 5, data.num_classes))
    assert [i.index for i in items] == [1, 2, 3, 4] and all(isinstance(i, Sample) for i in items)
    reads = plan_reads(entries, 1, 5, chunk)
    assert reads == [(1, 3), (3, 5)] and len(server.requests()) == 2
    expected = [f"GET /{shard.name} bytes={entries[first].offset}-{entries[last - 1].offset + entries[last - 1].length - 1}"
                for first, last in reads]
    assert sorted(server.requests()) == sorted(expected)  # sent together: they may arrive in either order


def test_a_lane_starts_only_the_segments_it_reads_at_once(tiny_data, http_server_factory):
    server = http_server_factory(tiny_data)
    data = open_prepared(server.url, RemoteOptions(retry_s=5))
    stream = TrainStream(data.train, batch_size=4, batches_per_epoch=data.train_samples // 4, rank=0, world_size=1,
                         seed=5, image_size=32, crop=None, baked=False, shuffle_buffer=0, eval_resize=36,
                         num_classes=data.num_classes, interleave_shards=2)
    server.clear_log()
    segments = stream.lane_segments(0, 1, epoch=0)
    assert len(segments) == len(data.train) and server.requests() == []  # opened, nothing sent yet
    samples = stream.lane_samples(0, 1, epoch=0, segments=segments)
    next(samples)
    time.sleep(0.5)  # whatever was sent has arrived
    assert len({line.split()[1] for line in server.requests()}) == 2  # the two segments read at once
    samples.close()


def test_the_cache_is_filled_reused_and_invalidated(tiny_data, http_server_factory, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(tiny_data, served)
    server = http_server_factory(served)
    options = RemoteOptions(retry_s=5, cache_dir=str(tmp_path / "cache"), cache_max_gb=1)
    reference = samples(open_prepared(tiny_data).train, 4)
    data = open_prepared(server.url, options)
    assert samples(data.train, 4) == reference  # epoch 1 fills the cache
    cached = sorted((tmp_path / "cache").glob("*.tar"))
    assert {p.stem for p in cached} == {s.sha256 for s in data.train}
    server.clear_log()
    assert samples(data.train, 4) == reference
    assert server.requests() == []  # epoch 2 reads the cache only
    # A cached copy of the wrong size is not used: fetched again.
    damaged = tmp_path / "cache" / f"{data.train[0].sha256}.tar"
    damaged.write_bytes(damaged.read_bytes()[:-512])
    assert samples(data.train, 4) == reference
    assert [line.split()[1] for line in server.requests()] == [f"/{data.train[0].name}"]
    # Shards prepared again (other contents, other checksums): the old copies are never read.
    params = PrepParams(**{**json.loads((tiny_data / "manifest.json").read_text())["parameters"]})
    shutil.rmtree(served)
    prepare(dataclasses.replace(params, seed=7), served)
    fresh = open_prepared(server.url, options)
    assert samples(fresh.train, 4) == samples(open_prepared(served).train, 4)
    assert {s.sha256 for s in fresh.train}.isdisjoint({s.sha256 for s in data.train})


def test_the_dataset_index_holds_every_shards_entries_and_verify_checks_it(tiny_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    assert verify(copy) == []
    index = DatasetIndex((copy / "index.npz").read_bytes())
    for shard in open_prepared(copy).train:
        own = load_index(shard.url)
        assert [(e.offset, e.length, e.fields) for e in index.entries(shard.name)] == \
            [(e.offset, e.length, {f: v for f, v in e.fields.items() if f != "json"}) for e in own]
    assert index.nbytes == 28 * sum(len(load_index(s.url)) for s in open_prepared(copy).train + open_prepared(copy).val)
    manifest = json.loads((copy / "manifest.json").read_text())
    first = manifest["splits"]["train"]["shards"][0]
    arrays = dict(np.load(copy / "index.npz"))
    arrays["offset"][1] += 512  # the second sample of the first shard
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    manifest["index"].update(bytes=len(buffer.getvalue()), sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
    (copy / "index.npz").write_bytes(buffer.getvalue())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    problems = verify(copy)
    assert len(problems) == 1 and f"index.npz: its entries for {first['name']} do not match" in problems[0]
    (copy / "index.npz").write_bytes(b"not an index")
    assert any("index.npz: differs from the manifest" in p for p in verify(copy))


def test_a_cache_that_cannot_be_written_is_skipped(tiny_data, http_server_factory, tmp_path):
    (tmp_path / "not-a-folder").write_text("x")  # the cache folder cannot be made: those shards stream
    options = RemoteOptions(retry_s=5, cache_dir=str(tmp_path / "not-a-folder" / "cache"))
    data = open_prepared(http_server_factory(tiny_data).url, options)
    assert samples(data.train, 4) == samples(open_prepared(tiny_data).train, 4)


def test_a_shard_cut_short_in_the_store_is_recorded_per_sample(tiny_data, http_server_factory, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(tiny_data, served)
    data = open_prepared(http_server_factory(served).url, RemoteOptions(retry_s=5))
    shard = data.train[0]
    entries = data.remote.entries(shard.name)
    (served / shard.name).write_bytes((served / shard.name).read_bytes()[:entries[3].offset + 100])
    items = list(shard_range(shard, 0, shard.samples, 4))
    assert [type(i).__name__ for i in items] == ["Sample"] * 3 + ["Skipped"] * (shard.samples - 3)
    assert "truncated shard" in items[3].reason


def test_a_shard_missing_from_the_store_stops_naming_it(tiny_data, http_server_factory, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(tiny_data, served)
    data = open_prepared(http_server_factory(served).url, RemoteOptions(retry_s=5))
    (served / data.train[2].name).unlink()
    with pytest.raises(StoreError, match=f"{data.train[2].name}: listed in the manifest but missing"):
        list(shard_range(data.train[2], 0, 2, 4))


def outage_run(tiny_data, http_server_factory, tmp_path, name: str, retry_s: float, restart_after_warning: bool):
    """A 1-process run from the HTTP server, the server killed once a checkpoint exists."""
    server = http_server_factory(tiny_data)
    args = [sys.executable, str(ROOT / "train.py"), *ONE, f"data.dir={server.url}",
            f"data.remote_retry_s={retry_s}", f"output_dir={tmp_path}", f"name={name}"]
    log = tmp_path / f"{name}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(args, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=err,
                                text=True)
        wait_for(lambda: steps_saved(tmp_path / name) or proc.poll() is not None, what="a checkpoint")
        server.stop()
        if restart_after_warning:  # down until a read has met the outage, then back
            wait_for(lambda: "retrying for up to" in log.read_text() or proc.poll() is not None, what="a retry")
            time.sleep(1)
            server.start()
        proc.wait(timeout=300)
    return proc.returncode, log.read_text(), server, args


@pytest.fixture(scope="module")
def straight_one(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight-one")
    subprocess.run([sys.executable, str(ROOT / "train.py"), *ONE, f"data.dir={tiny_data}",
                    f"output_dir={out}", "name=straight"], cwd=out, env=subprocess_env(), check=True,
                   capture_output=True, timeout=300)
    return out / "straight"


@pytest.mark.slow
def test_a_store_back_within_the_retry_time_lets_training_go_on(tiny_data, http_server_factory, straight_one,
                                                                 tmp_path):
    code, stderr, _, _ = outage_run(tiny_data, http_server_factory, tmp_path, "blip", 120, True)
    assert code == 0, stderr[-3000:]
    assert "retrying for up to 120 s (data.remote_retry_s)" in stderr and not error_lines(stderr)
    same_weights(straight_one, tmp_path / "blip")


@pytest.mark.slow
def test_a_store_that_stays_down_stops_with_one_line_and_resumes_exactly(tiny_data, http_server_factory,
                                                                          straight_one, tmp_path):
    code, stderr, server, args = outage_run(tiny_data, http_server_factory, tmp_path, "down", 2, False)
    lines = error_lines(stderr)
    assert code == 3 and len(lines) == 1, stderr[-3000:]
    print(lines[0])
    assert server.url in lines[0] and "did not answer for 2 s (data.remote_retry_s)" in lines[0]
    assert "Traceback" not in stderr
    saved = steps_saved(tmp_path / "down")
    assert saved  # the last checkpoint is intact: the resume below starts from it
    server.start()
    result = subprocess.run(args, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(step {saved[-1]})" in result.stderr and "resumed from" in result.stderr
    same_weights(straight_one, tmp_path / "down")


def test_a_server_without_range_requests_is_named(tiny_data):
    """Python's own http.server ignores Range: reading shards through it would fetch whole
    shards per read and cut samples at the wrong places, so it is refused with one line."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(tiny_data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(url), timeout=30, what="http.server")
        data = open_prepared(url, RemoteOptions(retry_s=5))
        with pytest.raises(StoreError, match="ignores range requests"):
            list(shard_range(data.train[0], 1, 3, 4))
    finally:
        server.kill()


def _answers(url: str) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(f"{url}/manifest.json", timeout=1).read()
        return True
    except OSError:
        return False


def test_a_stalled_read_is_retried_then_named(http_server_factory, tmp_path):
    """A server that stops sending mid-answer: each read gives up after the stall time and is
    retried; after the retry time the error names the URL and the stall."""
    blob = bytes(range(256)) * (70_000 // 256 + 1)
    (tmp_path / "big.bin").write_bytes(blob)  # more than the server's one 64 KiB burst
    (tmp_path / "small.bin").write_bytes(blob[:1000])
    server = http_server_factory(tmp_path, chunk_delay=30)  # 64 KiB, then silence
    store = Store(server.url, retry_s=3, stall_s=0.5)
    with pytest.raises(StoreUnavailable, match=r"big.bin: the store did not answer for 3 s .*Timeout"):
        store.read_range("big.bin", 0, len(blob))
    assert store.stats.retries >= 2
    assert store.read_range("small.bin", 0, 1000) == blob[:1000]  # a read within one burst is not a stall


def test_remote_options_reach_the_loader_and_pickle_without_connections(tiny_data, http_server_factory):
    import pickle

    server = http_server_factory(tiny_data)
    data = open_prepared(server.url, RemoteOptions(retry_s=7))
    assert data.train[0].remote is data.remote and data.remote.store.retry_s == 7
    data.remote.store.read("manifest.json")
    copy = pickle.loads(pickle.dumps(data.train[0]))  # without connections: each process makes its own
    assert samples([copy], 4) == samples([data.train[0]], 4)
    assert remote_module.MAX_IN_FLIGHT >= remote_module.PREFETCH + 1

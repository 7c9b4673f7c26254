"""Faults of object stores met by the real clients, against local servers that misbehave on
purpose (tests/fault_servers.py) or moto's S3 behind a proxy: a stalled GCS read is retried and
named within the retry time on the same filesystem; a 401 or 403 ends at once naming the
scheme's credentials (and an HTTPS one names no cloud); a node without Google credentials says so
at start-up; requester-pays reaches gcsfs and s3fs; preparing and training need no listing
outside the prefix; a failed upload part is sent again alone, and no shard is uploaded twice."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, subprocess_env
from fault_servers import FakeGCS, RefusingServer, S3Proxy
from PIL import Image
from test_faults import error_lines
from test_train import TINY

from data_prep.plan import PrepParams
from data_prep.synthetic import SyntheticSpec, generate
from data_prep.writer import run as prepare
from shards.store import Store, StoreError, StoreUnavailable

pytest.importorskip("gcsfs")
pytest.importorskip("s3fs")


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    """gcsfs pointed at a FakeGCS, on a node without Google credentials (nor a metadata server)."""
    with FakeGCS() as server:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        monkeypatch.setenv("NO_GCE_CHECK", "true")  # no probing for a metadata server
        monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud login of this machine
        monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        server.put("bkt/ds/manifest.json", b'{"format": "webdataset"}')
        yield server


def test_a_stalled_gcs_read_is_retried_then_named_within_the_retry_time(gcs):
    gcs.fault = "stall"  # headers and a byte, then nothing
    store = Store("gs://bkt/ds", retry_s=2, stall_s=0.5)
    fs = store.fs
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"^gs://bkt/ds/manifest.json: the store did not answer for 2 s "
                                               r"\(data.remote_retry_s\) while reading; last error .*Timeout"):
        store.read("manifest.json")
    elapsed = time.monotonic() - start
    print(f"a stalled GCS read (stall time 0.5 s, retry time 2 s): one line after {elapsed:.1f} s, "
          f"{store.stats.retries} retries")
    assert store.stats.retries >= 2 and len(gcs.requests()) == store.stats.retries + 1  # retried: by us only
    # the first stall, the retry time and a last stall (not gcsfs's own six tries with backoff of each one)
    assert elapsed < 0.5 + 2 + 0.5 + 10, elapsed
    gcs.fault = None
    assert store.read("manifest.json") == b'{"format": "webdataset"}'
    assert store.fs is fs  # retried on the same filesystem: no new one (nor a new credential look-up) per try


@pytest.mark.parametrize("fault, status", [("unauthorized", 401), ("forbidden", 403)])
def test_a_gcs_refusal_ends_at_once_naming_google_credentials(gcs, capfd, fault, status):
    gcs.fault = fault
    store = Store(f"gs://refuses-{status}/ds", retry_s=20)  # a bucket of its own: the warning is once per bucket
    with pytest.raises(StoreError) as info:
        store.read("manifest.json")
    line = str(info.value)
    assert line.startswith(f"gs://refuses-{status}/ds/manifest.json: access denied ({status}"), line
    assert "\n" not in line
    assert "GOOGLE_APPLICATION_CREDENTIALS" in line and "gcloud auth application-default login" in line, line
    assert "AWS" not in line
    assert len(gcs.requests()) == 1  # not retried
    warning = [w for w in capfd.readouterr().err.splitlines() if "no Google credentials" in w]
    assert len(warning) == 1 and "anonymous" in warning[0], warning  # said once, when the filesystem is made


def test_a_requester_pays_bucket_read_without_it_says_so_at_once(gcs):
    gcs.fault = "requester-pays"
    with pytest.raises(StoreError, match=r"^gs://bkt/ds/manifest.json: the bucket is requester-pays: set "
                                         r"data.requester_pays=true"):
        Store("gs://bkt/ds", retry_s=20).read("manifest.json")
    assert len(gcs.requests()) == 1


def test_gcs_with_credentials_and_requester_pays(gcs, capfd, tmp_path, monkeypatch):
    """Application default credentials (a user's, with a token still valid): no warning, bearer
    tokens sent; requester-pays bills the credentials' project; the reachability check lists
    inside the prefix only."""
    adc = tmp_path / "adc.json"
    adc.write_text(json.dumps({"type": "authorized_user", "client_id": "id", "client_secret": "secret",
                               "refresh_token": "refresh", "token": gcs.TOKEN, "expiry": "2099-01-01T00:00:00Z"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "billed-project")
    gcs.fault = "unauthorized"  # anonymous requests are refused
    store = Store("gs://bkt/ds", retry_s=5, requester_pays=True)
    store.check_reachable()
    assert store.read("manifest.json") == b'{"format": "webdataset"}'
    reads = [r for r in gcs.requests() if r.startswith("GET ")]
    assert len(reads) == 2 and all(r.endswith(" token") and "userProject=billed-project" in r for r in reads), reads
    assert "/storage/v1/b/bkt/o?" in reads[0] and "prefix=ds/&" in reads[0]  # a listing inside the prefix
    assert "no Google credentials" not in capfd.readouterr().err


def test_an_https_403_names_no_cloud_credentials():
    with RefusingServer(403) as server:
        store = Store(f"{server.url}/ds", retry_s=20)
        with pytest.raises(StoreError) as info:
            store.read("manifest.json")
        assert str(info.value) == f"{server.url}/ds/manifest.json: access denied (403)"
        assert len(server.requests()) == 1


# -------------------------------------------------------------------------------------------- S3
def aws_env(monkeypatch, s3_server, endpoint: str) -> dict:
    env = {**s3_server.env(), "AWS_ENDPOINT_URL": endpoint}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.mark.slow
def test_preparing_and_training_need_no_listing_outside_the_prefix(s3_server, monkeypatch, tmp_path):
    """A shared bucket whose policy allows requests only under one's own prefix (a proxy in
    front of moto refuses the rest, as S3 does: moto does not evaluate IAM conditions on
    s3:prefix): the preparation and a training run from there succeed; with
    data.requester_pays, the trainer's requests carry x-amz-request-payer."""
    s3_server.make_bucket("shared")
    images = tmp_path / "images"
    generate(images, SyntheticSpec(num_classes=4, train_per_class=6, val_per_class=2, min_side=40, max_side=56))
    with S3Proxy(s3_server.endpoint, allow_prefix="shared/team/me/ds/") as proxy:
        env = aws_env(monkeypatch, s3_server, proxy.url)
        with pytest.raises(StoreError, match="^s3://shared/team: access denied"):  # the policy holds
            Store("s3://shared/team", retry_s=5).check_reachable()
        params = PrepParams(train=str(images / "train"), val=str(images / "val"),
                            val_labels=str(images / "val_labels.txt"), shard_size=8)
        manifest = prepare(params, "s3://shared/team/me/ds", stage=tmp_path / "stage")
        assert proxy.completed_uploads()["shared/team/me/ds/manifest.json"] == 1
        prepared = len(proxy.entries)
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "data.dir=s3://shared/team/me/ds",
                                 "data.requester_pays=true", "train.max_steps=2", f"output_dir={tmp_path}",
                                 "name=prefix"], cwd=tmp_path, env={**subprocess_env(), **env},
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0 and not error_lines(result.stderr), result.stderr[-3000:]
        training = proxy.entries[prepared:]
    assert manifest["splits"]["train"]["samples"] == 24
    assert training and all(e["status"] in (200, 206) for e in training), training
    assert all(e["payer"] == "requester" for e in training)


def noise_jpeg(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95, subsampling=0)
    return out.getvalue()


@pytest.mark.slow
def test_a_failed_upload_part_is_sent_again_alone_and_no_shard_is_uploaded_twice(s3_server, monkeypatch, tmp_path):
    """A training shard of about 14 MB goes up in parts; the proxy fails part 1 once with
    IncompleteBody and drops the connection of part 2 once. The preparation completes, each part
    is sent again alone (one multipart upload for the shard, not a restarted one), every object
    is uploaded once, and the shard in the store is the staged one."""
    s3_server.make_bucket("parts")
    images = tmp_path / "images"
    generate(images, SyntheticSpec(num_classes=2, train_per_class=8, val_per_class=1, min_side=40, max_side=56))
    for seed, path in enumerate(sorted((images / "train").rglob("*.JPEG"))):
        path.write_bytes(noise_jpeg(600, seed))  # about 0.9 MB each: 16 of them make a multipart upload
    with S3Proxy(s3_server.endpoint, part_faults={1: "incomplete-body", 2: "drop"}) as proxy:
        aws_env(monkeypatch, s3_server, proxy.url)
        params = PrepParams(train=str(images / "train"), val=str(images / "val"),
                            val_labels=str(images / "val_labels.txt"), shard_size=16)
        manifest = prepare(params, "s3://parts/ds", stage=tmp_path / "stage")
    shard = manifest["splits"]["train"]["shards"][0]
    assert manifest["splits"]["train"]["samples"] == 16 and shard["bytes"] > 10 * 2**20
    key = f"parts/ds/{shard['name']}"
    part_tries = [(int(e["query"]["partNumber"]), e["status"]) for e in proxy.entries if "partNumber" in e["query"]]
    assert part_tries[:4] == [(1, 400), (1, 200), (2, -1), (2, 200)], part_tries
    starts = [e for e in proxy.entries if e["method"] == "POST" and "uploads" in e["query"]]
    assert [e["key"] for e in starts] == [key]  # one multipart upload, resumed, never restarted
    uploads = proxy.completed_uploads()
    assert uploads[key] == 1 and set(uploads.values()) == {1}, uploads
    assert {f"parts/ds/{s['name']}" for split in manifest["splits"].values() for s in split["shards"]} <= set(uploads)
    body = s3_server.client().get_object(Bucket="parts", Key=f"ds/{shard['name']}")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == shard["sha256"]

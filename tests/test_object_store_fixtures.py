"""The object-storage fixtures themselves (object_store.py): a ranged read over HTTP is one
ranged GET, the HTTP server comes back on its port after a kill, and moto's S3 stores,
serves and refuses what real S3 would."""
import os
import subprocess
import sys

import pytest

PAYLOAD = bytes(range(256)) * 40  # 10240 bytes


def test_ranged_read_is_one_get(http_server_factory, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    pytest.importorskip("aiohttp")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-000000.tar").write_bytes(PAYLOAD)
    server = http_server_factory(tmp_path / "shards")
    url = server.url + "/train-000000.tar"
    fs = fsspec.filesystem("http", skip_instance_cache=True)

    assert fs.cat_file(url, 100, 200) == PAYLOAD[100:200]
    assert server.requests() == ["GET /train-000000.tar bytes=100-199"]
    assert fs.size(url) == len(PAYLOAD)
    with pytest.raises(FileNotFoundError):
        fs.cat_file(server.url + "/missing.tar", 0, 10)
    assert len(server.requests()) == 3

    server.stop()
    with pytest.raises(OSError, match="Cannot connect"):  # aiohttp.ClientConnectorError
        fs.cat_file(url, 0, 10)
    server.start()  # the same port: the same filesystem object carries on
    server.clear_log()
    assert fs.cat_file(url, 10240 - 5, 10240) == PAYLOAD[-5:]
    assert server.requests() == ["GET /train-000000.tar bytes=10235-10239"]


def test_s3_round_trip(s3_server, tmp_path):
    pytest.importorskip("s3fs")
    local = tmp_path / "prepared"
    (local / "train").mkdir(parents=True)
    (local / "train" / "shard-0.tar").write_bytes(PAYLOAD)
    (local / "manifest.json").write_text('{"splits": {}}')
    bucket = s3_server.make_bucket("round-trip")

    assert s3_server.upload_dir(local, bucket, "data/v1") == ["data/v1/manifest.json", "data/v1/train/shard-0.tar"]
    assert s3_server.list_keys(bucket, "data/v1/train") == ["data/v1/train/shard-0.tar"]
    fs = s3_server.filesystem()
    assert fs.cat_file(f"{bucket}/data/v1/train/shard-0.tar", start=5, end=9) == PAYLOAD[5:9]
    fs.pipe_file(f"{bucket}/data/v1/written.bin", b"abc")
    assert "data/v1/written.bin" in s3_server.list_keys(bucket)
    with pytest.raises(FileNotFoundError, match="The specified bucket does not exist"):
        fs.cat_file("no-such-bucket/data/v1/manifest.json")
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{bucket}/data/v1/missing.json")


def test_s3_wrong_credentials_are_rejected(s3_server):
    pytest.importorskip("s3fs")
    bucket = s3_server.make_bucket("credentials")
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"secret")

    with pytest.raises(PermissionError, match="signature we calculated does not match"):
        s3_server.filesystem(secret_key="wrong").ls(bucket)
    with pytest.raises(PermissionError, match="Access Key Id you provided does not exist"):
        s3_server.filesystem(access_key="AKIAUNKNOWN000000000", secret_key="x").cat_file(f"{bucket}/k", start=0, end=3)
    with pytest.raises(PermissionError, match="Forbidden"):  # a HEAD has no body, so no error code
        s3_server.filesystem(secret_key="wrong").info(f"{bucket}/k")


def test_s3_env_for_a_child_process(s3_server):
    pytest.importorskip("s3fs")
    bucket = s3_server.make_bucket("child-env")
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"from the child")
    code = f"import s3fs; print(s3fs.S3FileSystem(skip_instance_cache=True).cat_file('{bucket}/k').decode())"
    ok = subprocess.run([sys.executable, "-c", code], env={**os.environ, **s3_server.env()},
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "from the child"
    bad = subprocess.run([sys.executable, "-c", code], env={**os.environ, **s3_server.env(secret_key="wrong")},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "PermissionError" in bad.stderr

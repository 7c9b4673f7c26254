"""Credentials for S3 looked up once per process, against moto's S3 (IAM authentication on) and a
local instance metadata service that hands out an IAM role's temporary credentials
(``tests/metadata_server.py``): two training processes with two loader workers each look them up
once per process, their workers asking them; a look-up that was refused or timed out is retried
like a failing store, while no credentials anywhere is one line at once; credentials close to
their expiry are refreshed by one thread; keys in environment variables need no look-up."""
from __future__ import annotations

import collections
import os
import subprocess
import time

import pytest
from conftest import subprocess_env
from metadata_server import MetadataServer, role_credentials
from object_store import REGION, free_port
from test_faults import wait_for
from test_train import TINY, launch_command

from shards import credentials
from shards.store import Store, StoreError

BUCKET = "credentials-test"


@pytest.fixture(scope="module")
def instance_role(s3_server):
    """New temporary credentials of a role allowed s3:* on the test server, a call each; the bucket
    holds ``unit/hello.txt``."""
    s3_server.make_bucket(BUCKET)
    s3_server.client().put_object(Bucket=BUCKET, Key="unit/hello.txt", Body=b"hello")
    return role_credentials(s3_server)


def instance_env(s3_server, metadata_url: str, tmp_path) -> dict:
    """AWS's variables of a machine whose only credentials are its instance role's: no keys, no
    profile files, the metadata service at ``metadata_url``."""
    return {"AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": s3_server.endpoint,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": metadata_url, "AWS_METADATA_SERVICE_TIMEOUT": "1",
            "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"), "NO_PROXY": "127.0.0.1,localhost"}


def use_env(monkeypatch, env: dict) -> None:
    """Only ``env``'s AWS variables while the test runs (and no process sharing its credentials)."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv(credentials.SHARE_ENV, "")  # removed again at the end, if this process began to share
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_a_refused_or_timed_out_credential_fetch_is_retried_not_final(s3_server, instance_role, monkeypatch,
                                                                      tmp_path, capfd):
    """The metadata service first lets the look-up time out, then refuses it (429): both are
    retried within the store's retry time, and the third look-up's credentials read the object."""
    with MetadataServer(instance_role) as metadata:
        metadata.plan = ["hang", "refuse"]
        use_env(monkeypatch, instance_env(s3_server, metadata.url, tmp_path))
        store = Store(f"s3://{BUCKET}/unit", retry_s=60)
        assert store.read("hello.txt") == b"hello"
        assert [call.outcome for call in metadata.lookups()] == ["hung", "refused", "credentials"]
    assert store.stats.retries == 2
    err = capfd.readouterr().err
    assert f"warning: s3://{BUCKET}/unit/hello.txt:" in err and "retrying for up to 60 s" in err, err
    assert "no credentials found" not in err


def test_no_credentials_anywhere_is_one_line_at_once(s3_server, instance_role, monkeypatch, tmp_path):
    """No keys and nothing listening where the metadata service would be: configured nowhere,
    which retrying cannot change."""
    use_env(monkeypatch, instance_env(s3_server, f"http://127.0.0.1:{free_port()}/", tmp_path))
    store = Store(f"s3://{BUCKET}/unit", retry_s=60)
    with pytest.raises(StoreError, match=rf"^s3://{BUCKET}/unit/hello.txt: no credentials found \("):
        store.read("hello.txt")
    assert store.stats.retries == 0


def test_static_credentials_need_no_look_up(s3_server, instance_role, monkeypatch, tmp_path):
    with MetadataServer(instance_role) as metadata:
        use_env(monkeypatch, {**instance_env(s3_server, metadata.url, tmp_path),
                              "AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key})
        assert Store(f"s3://{BUCKET}/unit").read("hello.txt") == b"hello"
        assert metadata.lookups() == []


def test_temporary_credentials_are_refreshed_by_one_thread_before_they_expire(s3_server, instance_role, monkeypatch,
                                                                             tmp_path):
    """Container credentials that come within 15 minutes of their expiry 3 s after they are
    issued (botocore refreshes only inside that window; the lead is set to it): the process's
    refreshing thread fetches new ones, once, with no request asking; reads then sign with them."""
    monkeypatch.setattr(credentials, "REFRESH_CHECK_S", 0.05)
    monkeypatch.setattr(credentials, "REFRESH_LEAD_S", (15 * 60, 15 * 60))
    with MetadataServer(instance_role, expires_in_s=(15 * 60 + 3, 3600)) as metadata:
        use_env(monkeypatch, {**instance_env(s3_server, metadata.url, tmp_path),
                              "AWS_CONTAINER_CREDENTIALS_FULL_URI": metadata.url + "/container-credentials"})
        store = Store(f"s3://{BUCKET}/unit")
        assert store.read("hello.txt") == b"hello"
        wait_for(lambda: len(metadata.lookups()) >= 2, timeout=60, what="the refresh")
        assert store.read("hello.txt") == b"hello"
        assert credentials.current_credentials().access_key == metadata.issued[1]
        time.sleep(20 * credentials.REFRESH_CHECK_S)  # the new ones last an hour: no more refreshing
        assert [(call.outcome, call.pid) for call in metadata.lookups()] == [("credentials", os.getpid())] * 2


@pytest.mark.slow
def test_two_processes_with_two_workers_each_look_credentials_up_once_per_process(s3_server, instance_role,
                                                                                  tiny_data, tmp_path):
    """A 2-process run (2 loader workers each) reading its shards from S3 with its instance
    role's credentials, from a metadata service that refuses more than 2 calls at once: at most
    one look-up per training process, none by a loader worker."""
    s3_server.upload_dir(tiny_data, BUCKET, "tiny")
    with MetadataServer(instance_role, max_concurrent=2, hold_s=0.2) as metadata:
        env = {k: v for k, v in subprocess_env().items() if not k.startswith("AWS_") and k != credentials.SHARE_ENV}
        env.update(instance_env(s3_server, metadata.url, tmp_path))
        command = launch_command(2, *TINY, "data.workers=2", "train.max_steps=3", f"data.dir=s3://{BUCKET}/tiny",
                                 f"output_dir={tmp_path}", "name=instance-role")
        launcher = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
        _, stderr = launcher.communicate(timeout=600)
        lookups = metadata.lookups()
    assert launcher.returncode == 0, stderr[-4000:]
    shown = "\n".join(f"{call.outcome} pid {call.pid} (parent {call.parent})" for call in lookups)
    assert 1 <= len(lookups) <= 2, f"{len(lookups)} credential look-ups for 2 processes:\n{shown}"
    per_process = collections.Counter(call.pid for call in lookups if call.pid is not None)
    assert all(count == 1 for count in per_process.values()), shown
    assert all(call.parent == launcher.pid for call in lookups if call.pid is not None), \
        f"a look-up by a loader worker (the launcher is {launcher.pid}):\n{shown}"
    assert {call.outcome for call in lookups} == {"credentials"}, shown

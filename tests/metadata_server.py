"""A local instance metadata service (IMDSv2) and container credentials endpoint on 127.0.0.1, for
the tests of credential look-ups; its credentials are an IAM role's, issued by moto's STS.

``MetadataServer`` answers what botocore asks: ``PUT /latest/api/token`` (a session token),
``GET /latest/meta-data/iam/security-credentials/`` (the role's name) and ``.../ROLE`` (temporary
credentials), and ``GET /container-credentials`` (the same, as ECS and EKS serve them, for
``AWS_CONTAINER_CREDENTIALS_FULL_URI``). Each credential call is recorded with the pid of the
process that made it (found in ``/proc`` from its socket), so a test can count look-ups per
process. As a throttled service does, it refuses (429) calls beyond ``max_concurrent`` at once;
``plan`` says what the next credential calls get instead of credentials: ``"refuse"`` (429) or
``"hang"`` (no answer for ``hang_s``, longer than the client's timeout).

``role_credentials(server)`` makes the role on an ``object_store.S3Server`` and returns a function
that assumes it, as the instance's role is assumed: each call new keys and a session token that
moto checks on every S3 request.
"""
from __future__ import annotations

import datetime
import json
import os
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

ROLE = "instance-role"
TOKEN_PATH = "/latest/api/token"
ROLE_PATH = "/latest/meta-data/iam/security-credentials/"
CONTAINER_PATH = "/container-credentials"
_S3_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
_ASSUME_ANY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}]}
_TRUST_ANYONE = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"},
                                                         "Action": "sts:AssumeRole"}]}


@dataclass(frozen=True)
class CredentialCall:
    path: str
    outcome: str  # "credentials", "refused" (429), "hung" or "denied" (no session token)
    pid: int | None  # the caller, and its parent; None where /proc did not tell
    parent: int | None


def role_credentials(s3_server) -> Callable[[], dict]:
    """A function returning new temporary credentials (``AccessKeyId``, ``SecretAccessKey``,
    ``SessionToken``) of a role allowed ``s3:*`` on ``s3_server`` (moto, authentication on)."""
    import boto3
    from object_store import REGION

    # The set-up needs IAM rights no test user has: moto's reset-auth lets exactly its five calls
    # through unauthenticated, then checks every request again.
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(urllib.request.Request(
            s3_server.endpoint + "/moto-api/reset-auth", data=b"5", method="POST",
            headers={"Content-Type": "text/plain"}), timeout=10) as response:
        response.read()
    suffix = uuid.uuid4().hex[:8]
    iam = boto3.client("iam", endpoint_url=s3_server.endpoint, region_name=REGION,
                       aws_access_key_id="set-up", aws_secret_access_key="set-up")
    role_arn = iam.create_role(RoleName=f"{ROLE}-{suffix}",
                               AssumeRolePolicyDocument=json.dumps(_TRUST_ANYONE))["Role"]["Arn"]
    iam.put_role_policy(RoleName=f"{ROLE}-{suffix}", PolicyName="s3-all", PolicyDocument=json.dumps(_S3_ALL))
    iam.create_user(UserName=f"metadata-service-{suffix}")
    iam.put_user_policy(UserName=f"metadata-service-{suffix}", PolicyName="assume",
                        PolicyDocument=json.dumps(_ASSUME_ANY))
    key = iam.create_access_key(UserName=f"metadata-service-{suffix}")["AccessKey"]
    sts = boto3.client("sts", endpoint_url=s3_server.endpoint, region_name=REGION,
                       aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
    lock = threading.Lock()  # one boto3 client, called from the server's threads

    def assume() -> dict:
        with lock:
            return sts.assume_role(RoleArn=role_arn, RoleSessionName="instance")["Credentials"]

    return assume


def _peer_pid(client_port: int, server_port: int) -> tuple[int | None, int | None]:
    """The pid (and its parent's) that holds the client end of a connection to 127.0.0.1, from
    /proc/net/tcp and the processes' file descriptors; (None, None) where that cannot be read."""
    local, remote = f"0100007F:{client_port:04X}", f"0100007F:{server_port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            inode = next(fields[9] for fields in (line.split() for line in f)
                         if len(fields) > 9 and fields[1] == local and fields[2] == remote)
    except (OSError, StopIteration):
        return None, None
    target = f"socket:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                with open(f"/proc/{pid}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                return int(pid), parent
        except OSError:  # another user's process, or one that just ended
            continue
    return None, None


class MetadataServer:
    """IMDSv2 and a container credentials endpoint, in a thread of this process (see the module)."""

    def __init__(self, issue: Callable[[], dict], max_concurrent: int = 1000, hold_s: float = 0.0,
                 hang_s: float = 3.0, expires_in_s: tuple[float, ...] = (3600.0,)):
        self.issue = issue
        self.max_concurrent = max_concurrent
        self.hold_s = hold_s  # each answer waits this long: calls that come together overlap
        self.hang_s = hang_s
        self.expires_in_s = list(expires_in_s)  # each look-up's credentials expire so long after it (the last repeats)
        self.plan: list[str] = []
        self.calls: list[CredentialCall] = []
        self.issued: list[str] = []  # the access keys handed out, in order
        self._lock = threading.Lock()
        self._in_flight = 0
        self._tokens: set[str] = set()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def lookups(self) -> list[CredentialCall]:
        with self._lock:
            return list(self.calls)

    def start(self) -> MetadataServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):
                pass

            def _send(self, status: int, body: str = "", content_type: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):
                server._serve(self, "PUT")

            def do_GET(self):
                server._serve(self, "GET")

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that gave up on a hung call

        self._httpd = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="metadata-server").start()
        return self

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> MetadataServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- answering ------------------------------------------------------------------------------
    def _serve(self, handler, method: str) -> None:
        path = handler.path.split("?")[0]
        credential_call = method == "GET" and (path == CONTAINER_PATH or path == ROLE_PATH + ROLE)
        with self._lock:
            self._in_flight += 1
            crowded = self._in_flight > self.max_concurrent
            step = self.plan.pop(0) if credential_call and self.plan and not crowded else None
        try:
            if credential_call:
                outcome = "refused" if crowded or step == "refuse" else "hung" if step == "hang" else "credentials"
                if path != CONTAINER_PATH and handler.headers.get("x-aws-ec2-metadata-token") not in self._tokens:
                    outcome = "denied"
                caller = _peer_pid(handler.client_address[1], self._httpd.server_address[1])
                with self._lock:  # recorded as it comes: a test may end while a call hangs
                    self.calls.append(CredentialCall(path, outcome, *caller))
            time.sleep(self.hold_s)
            if crowded or step == "refuse":
                status, body = 429, "Too Many Requests"
            elif step == "hang":
                time.sleep(self.hang_s)
                status, body = 429, "Too Many Requests"  # long after the client gave up
            else:
                status, body = self._answer(handler, method, path)
            handler._send(status, body, "application/json" if body.startswith("{") else "text/plain")
        except OSError:
            pass  # the client has gone
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer(self, handler, method: str, path: str) -> tuple[int, str]:
        if method == "PUT" and path == TOKEN_PATH:
            if not handler.headers.get("x-aws-ec2-metadata-token-ttl-seconds"):
                return 400, "missing x-aws-ec2-metadata-token-ttl-seconds"
            token = uuid.uuid4().hex
            with self._lock:
                self._tokens.add(token)
            return 200, token
        if method == "GET" and path == CONTAINER_PATH:
            return 200, json.dumps(self._credentials())
        if method == "GET" and path.startswith(ROLE_PATH):
            if handler.headers.get("x-aws-ec2-metadata-token") not in self._tokens:
                return 401, "IMDSv2 only: a session token is needed"
            if path == ROLE_PATH:
                return 200, ROLE
            if path == ROLE_PATH + ROLE:
                return 200, json.dumps({"Code": "Success", "Type": "AWS-HMAC", **self._credentials()})
        return 404, "not found"

    def _credentials(self) -> dict:
        issued = self.issue()
        with self._lock:
            self.issued.append(issued["AccessKeyId"])
            lifetime = self.expires_in_s.pop(0) if len(self.expires_in_s) > 1 else self.expires_in_s[0]
        expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=lifetime)
        return {"AccessKeyId": issued["AccessKeyId"], "SecretAccessKey": issued["SecretAccessKey"],
                "Token": issued["SessionToken"], "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "LastUpdated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}

"""Real object-storage servers on 127.0.0.1, for the tests of reading prepared datasets remotely.

``S3Server``: moto in server mode (``python -m moto.server``) in a subprocess, with IAM
authentication switched on once its test user exists, so that wrong credentials are rejected
by the server (SignatureDoesNotMatch, InvalidAccessKeyId) as they would be by AWS.

``RangeHTTPServer``: a small threaded HTTP/1.1 server in a subprocess that serves a directory
read-only with single ``Range: bytes=a-b`` requests, and logs one line per request so that a
test can count them; SIGKILL it mid-transfer and start it again on the same port.

Run the HTTP server by hand with ``python tests/object_store.py serve DIR PORT LOG``.
Nothing here imports boto3 or moto at module level: they are imported when an S3Server starts.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REGION = "us-east-1"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an http_proxy
_S3_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def free_port() -> int:
    """A port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_listening(proc: subprocess.Popen, port: int, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s:\n{_tail(log)}")


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the thread that started it dies (Linux), so that a
    killed test run leaves no server behind. Start servers from a long-lived thread (the main one)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.wait()


class S3Server:
    """moto's S3 (and IAM) as a real server on 127.0.0.1.

    The valid credentials are an IAM user's access key (``access_key``, ``secret_key``) with a
    policy allowing ``s3:*``; every request after the set-up must be signed with it. moto keeps
    its state in memory: ``stop()`` loses every bucket, and a stopped server is not restarted.
    """

    def __init__(self, workdir: Path | str | None = None, start_timeout: float = 30.0):
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="moto-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "moto.log"
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.access_key = ""
        self.secret_key = ""

    # -- life cycle --------------------------------------------------------------------------
    def start(self) -> S3Server:
        last: Exception | None = None
        for _ in range(3):  # the free port may be taken between picking and binding it
            self.port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
            env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)  # authentication is switched on below
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            try:
                self._wait_until_answering()
                break
            except RuntimeError as exc:
                last = exc
                _kill(self.proc)
        else:
            raise RuntimeError(f"moto server did not start: {last}")
        self._enable_authentication()
        return self

    def _wait_until_answering(self) -> None:
        _wait_until_listening(self.proc, self.port, self.start_timeout, "moto server", self.log_path)
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                with _DIRECT.open(self.endpoint + "/moto-api/", timeout=5) as r:
                    r.read()
                return
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"moto server does not answer:\n{_tail(self.log_path)}") from None
                time.sleep(0.05)

    def _enable_authentication(self) -> None:
        """Create the IAM user, its s3:* policy and its access key while moto checks nothing,
        then make moto check every later request (POST /moto-api/reset-auth with 0)."""
        import boto3

        iam = boto3.client(
            "iam", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="dataset-reader")
        iam.put_user_policy(UserName="dataset-reader", PolicyName="s3-all", PolicyDocument=json.dumps(_S3_ALL))
        key = iam.create_access_key(UserName="dataset-reader")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        request = urllib.request.Request(
            self.endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
            headers={"Content-Type": "text/plain"},  # not form-encoded, or moto reads an empty body
        )
        with _DIRECT.open(request, timeout=10) as r:
            r.read()

    def stop(self) -> None:
        """SIGKILL the server (an outage: the port then refuses connections; state is lost)."""
        _kill(self.proc)

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- what clients need -------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, access_key: str | None = None, secret_key: str | None = None) -> dict:
        """Environment variables for a child process (merge them into os.environ); the valid
        credentials unless others are given."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key if access_key is None else access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key if secret_key is None else secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance-metadata service
        }

    def storage_options(self, access_key: str | None = None, secret_key: str | None = None) -> dict:
        """fsspec/s3fs keyword arguments for this server."""
        return {
            "key": self.access_key if access_key is None else access_key,
            "secret": self.secret_key if secret_key is None else secret_key,
            "endpoint_url": self.endpoint,
            "client_kwargs": {"region_name": REGION},
        }

    def filesystem(self, access_key: str | None = None, secret_key: str | None = None, **kwargs):
        """A fresh (not instance-cached) s3fs.S3FileSystem for this server."""
        import s3fs

        kwargs.setdefault("skip_instance_cache", True)
        return s3fs.S3FileSystem(**self.storage_options(access_key, secret_key), **kwargs)

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=self.access_key if access_key is None else access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
        )

    # -- fixtures' helpers -------------------------------------------------------------------
    def make_bucket(self, name: str) -> str:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def upload_dir(self, local_dir: Path | str, bucket: str, prefix: str = "") -> list[str]:
        """Every file under local_dir, recursively, as ``prefix/relative/path``; the keys."""
        client = self.client()
        root = Path(local_dir)
        prefix = prefix.strip("/")
        keys = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            key = f"{prefix}/{rel}" if prefix else rel
            client.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return sorted(obj["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                      for obj in page.get("Contents", []))

    def requests(self) -> list[str]:
        """The requests the server has answered, as ``METHOD PATH?QUERY STATUS`` (from werkzeug's
        access log; includes the set-up's IAM calls and /moto-api/ calls)."""
        out = []
        for line in _tail(self.log_path, n=10**9).splitlines():
            start, end = line.find('"'), line.rfind('"')
            if line.startswith("127.0.0.1 - - [") and 0 < start < end:
                method, path, *_ = line[start + 1:end].split(" ") + [""]
                status = line[end + 1:].split()[0] if line[end + 1:].split() else ""
                out.append(f"{method} {path} {status}")
        return out

    def request_count(self) -> int:
        return len(self.requests())


class RangeHTTPServer:
    """A directory served read-only over HTTP/1.1 with byte ranges, in a subprocess.

    ``start()`` (again after ``stop()``: the same port), ``stop()`` (SIGKILL), ``url``,
    ``requests()`` (one ``METHOD PATH RANGE`` a request, RANGE ``-`` when none),
    ``clear_log()``. ``chunk_delay`` seconds are slept after each 64 KiB of a body, so that a
    test can kill the server in the middle of a transfer.
    """

    def __init__(self, directory: Path | str, log_path: Path | str | None = None, port: int | None = None,
                 chunk_delay: float = 0.0, start_timeout: float = 20.0):
        self.directory = Path(directory).resolve()
        self._own_log = log_path is None
        self.log_path = Path(tempfile.mkstemp(prefix="http-", suffix=".log")[1]) if log_path is None else Path(log_path)
        self.log_path.touch()
        self.stderr_path = self.log_path.with_name(self.log_path.name + ".stderr")
        self.port = free_port() if port is None else port
        self.chunk_delay = chunk_delay
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> RangeHTTPServer:
        if self.running:
            return self
        command = [sys.executable, str(Path(__file__).resolve()), "serve", str(self.directory), str(self.port),
                   str(self.log_path), "--chunk-delay", str(self.chunk_delay)]
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        _wait_until_listening(self.proc, self.port, self.start_timeout, "range HTTP server", self.stderr_path)
        return self

    def stop(self) -> None:
        """SIGKILL: connections are cut, whatever they were sending."""
        _kill(self.proc)

    def close(self) -> None:
        self.stop()
        if self._own_log:
            for path in (self.log_path, self.stderr_path):
                path.unlink(missing_ok=True)

    def requests(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def clear_log(self) -> None:
        self.log_path.write_text("")  # the server appends with O_APPEND: truncating is safe

    def __enter__(self) -> RangeHTTPServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# -- the HTTP server itself (runs in the subprocess) ----------------------------------------------
def serve(directory: str, port: int, log: str, chunk_delay: float = 0.0) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import unquote, urlsplit

    root = Path(directory).resolve()
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    chunk = 64 * 1024

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        server_version = "RangeHTTP/1.0"
        disable_nagle_algorithm = True  # or headers and body in two writes cost a 40 ms delayed ACK

        def log_message(self, format, *args):  # no per-request noise on stderr
            pass

        def _file(self) -> Path | None:
            rel = unquote(urlsplit(self.path).path).lstrip("/")
            path = (root / rel).resolve()
            if path != root and root not in path.parents:
                return None
            return path if path.is_file() else None

        def _plain(self, code: int, text: str, extra: dict | None = None, body: bool = True) -> None:
            data = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _range(self, header: str, size: int) -> tuple[int, int] | None:
            """(first, last) inclusive, or None when unsatisfiable or malformed."""
            if not header.startswith("bytes=") or "," in header:
                return None
            first, _, last = header[len("bytes="):].strip().partition("-")
            try:
                if first == "":  # the last N bytes
                    n = int(last)
                    return (max(size - n, 0), size - 1) if n > 0 and size > 0 else None
                a = int(first)
                b = int(last) if last else size - 1
            except ValueError:
                return None
            if a < 0 or a >= size or b < a:
                return None
            return a, min(b, size - 1)

        def _respond(self, body: bool) -> None:
            header = self.headers.get("Range")
            os.write(log_fd, f"{self.command} {self.path} {(header or '-').replace(' ', '')}\n".encode())
            path = self._file()
            if path is None:
                return self._plain(404, "not found\n", body=body)
            size = path.stat().st_size
            common = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                      "Last-Modified": self.date_time_string(int(path.stat().st_mtime))}
            if header is not None:
                span = self._range(header, size)
                if span is None:
                    return self._plain(416, "range not satisfiable\n", {"Content-Range": f"bytes */{size}"}, body)
                code, (a, b) = 206, span
            else:
                code, (a, b) = 200, (0, size - 1)
            self.send_response(code)
            for k, v in common.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(b - a + 1))
            if code == 206:
                self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
            self.end_headers()
            if not body:
                return
            with open(path, "rb") as f:
                f.seek(a)
                left = b - a + 1
                while left > 0:
                    data = f.read(min(chunk, left))
                    if not data:
                        break
                    self.wfile.write(data)
                    left -= len(data)
                    if chunk_delay and left > 0:
                        self.wfile.flush()
                        time.sleep(chunk_delay)

        def do_GET(self):
            self._respond(body=True)

        def do_HEAD(self):
            self._respond(body=False)

        def _read_only(self):
            os.write(log_fd, f"{self.command} {self.path} -\n".encode())
            self.close_connection = True  # its body, if any, is not read
            self._plain(405, "read-only\n", {"Allow": "GET, HEAD"})

        do_PUT = do_POST = do_DELETE = do_PATCH = _read_only

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True  # restart on the same port despite TIME_WAIT connections

        def handle_error(self, request, client_address):
            if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                super().handle_error(request, client_address)

    httpd = Server(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start())
    httpd.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve DIR read-only with byte ranges on 127.0.0.1:PORT, logging to LOG")
    p.add_argument("directory")
    p.add_argument("port", type=int)
    p.add_argument("log")
    p.add_argument("--chunk-delay", type=float, default=0.0, help="seconds slept after each 64 KiB of a body")
    args = parser.parse_args(argv)
    serve(args.directory, args.port, args.log, args.chunk_delay)


if __name__ == "__main__":
    main()

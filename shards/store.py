"""Where a prepared dataset lives: a local folder, or an object store (``s3://``, ``gs://``,
``http(s)://``) read through fsspec.

A ``Store`` names files relative to the dataset's location and does the few things the
pipeline needs: read a whole small object, read a byte range, upload a file, test existence.
Local folders take the plain file API (the loader's hot path does not go through here).

Remote calls are retried with backoff for ``retry_s`` seconds when the store fails or stalls
(connection refused or reset, timeouts, 5xx answers); then ``StoreUnavailable`` names the URL
and the last cause. What retrying cannot fix fails at once with ``StoreError``: wrong
credentials, a missing bucket or object. Credentials and endpoints come from the standard
places (AWS's environment variables and config files, ``AWS_ENDPOINT_URL`` for S3-compatible
stores; Google's application default credentials) and never appear in messages: URLs are
shown without user information or query strings.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https")
STALL_S = 30.0  # a read with no data for this long is a stall: retried like a failure
CONNECT_S = 10.0


class StoreError(RuntimeError):
    """A remote location cannot be used as asked (credentials, a missing bucket or object)."""


class ObjectMissing(FileNotFoundError):
    """The store answered that the object (or its bucket) does not exist."""


class RangeNotSatisfiable(StoreError):
    """A ranged read that starts past the object's end (a shard shorter than its index says)."""


class StoreUnavailable(StoreError):
    """The store kept failing or stalling for the whole retry time."""


def error_line(exc: BaseException) -> str:
    """The store's own message, also when a DataLoader re-raised it with the worker's traceback."""
    last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return re.sub(r"^[\w.]*(StoreError|StoreUnavailable): ", "", last)


def is_remote(location: str | os.PathLike) -> bool:
    return isinstance(location, str) and urlsplit(location).scheme in REMOTE_SCHEMES


def redact(url: str) -> str:
    """A URL fit for a log line: without user:password@ and without a query (signed URLs)."""
    if not is_remote(url):
        return str(url)
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _filesystem(scheme: str, stall_s: float = STALL_S):
    """A fresh fsspec filesystem with short connect and stall timeouts: our own loop retries."""
    try:
        import fsspec
        if scheme == "s3":
            import s3fs  # noqa: F401
        elif scheme in ("gs", "gcs"):
            import gcsfs  # noqa: F401
    except ImportError as exc:
        raise StoreError(f"{scheme}:// needs the 'remote' extra ({exc.name} is not installed): "
                         "pip install 'googlenet-pipeline[remote]' or bash scripts/setup.sh --remote") from None

    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = fsspec.filesystem(
            "s3", skip_instance_cache=True, use_listings_cache=False, endpoint_url=endpoint or None,
            config_kwargs={"connect_timeout": CONNECT_S, "read_timeout": stall_s, "retries": {"max_attempts": 0}})
        fs.retries = 1  # s3fs's own retry loop (a class attribute, not a constructor argument)
        return fs
    if scheme in ("gs", "gcs"):
        logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # it logs each failure's traceback: ours is one line
        return fsspec.filesystem("gcs", skip_instance_cache=True, use_listings_cache=False)
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_S, sock_read=stall_s)
    return fsspec.filesystem("http", skip_instance_cache=True, client_kwargs={"timeout": timeout})


def _permanent(exc: BaseException) -> str | None:
    """Why ``exc`` will not go away by retrying (None: it may, retry)."""
    text = f"{exc} {exc.__cause__ or ''}"
    if "InvalidRange" in text or "range not satisfiable" in text.lower() or "range is not satisfiable" in text:
        return "range"
    if isinstance(exc, FileNotFoundError) and isinstance(exc.__cause__, OSError):
        return None  # fsspec's http says "not found" for a HEAD that could not connect
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text or "NoSuchKey" in text:
        return "not found"
    if isinstance(exc, PermissionError) or any(code in text for code in (
            "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")):
        return "access denied (check the credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "\
            "GOOGLE_APPLICATION_CREDENTIALS)"
    if "NoCredentialsError" in type(exc).__name__ or "Unable to locate credentials" in text:
        return "no credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    status = next((s for s in (getattr(exc, "status", None), getattr(exc.__cause__, "status", None))
                   if isinstance(s, int)), None)
    if status is not None and 400 <= status < 500 and status not in (408, 429):  # the request, not the store
        return f"refused ({status}: {_cause(exc)})"
    if isinstance(exc, OSError) and exc.errno in (errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOSYS):
        return f"refused ({_cause(exc)})"  # s3fs's translation of a 4xx answer (a wrong region, a bad token)
    return None


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = re.sub(r"(\w+://)[^/@\s'\"]*@", r"\1", text)  # no user:password@ (aiohttp's messages show URLs)
    text = re.sub(r"\?[^\s'\")]*", "", text)[:200]  # no query strings (signed URLs)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class RequestStats:
    """What this process asked of the store (per process: loader workers count their own)."""
    requests: int = 0
    bytes: int = 0
    retries: int = 0


@dataclass
class Store:
    """A dataset location. ``retry_s``: how long a failing or stalling store is retried."""
    location: str
    retry_s: float = 120.0
    stall_s: float = STALL_S  # no data for this long: the read is retried
    requester_pays: bool = False  # the bucket bills the reader (data.requester_pays)
    stats: RequestStats = field(default_factory=RequestStats)

    def __post_init__(self):
        self.location = str(self.location).rstrip("/") if is_remote(self.location) else str(self.location)
        self.remote = is_remote(self.location)
        self._fs, self._pid, self._lock = None, None, threading.Lock()

    def __getstate__(self):  # filesystems hold event loops and sockets: each process makes its own
        state = self.__dict__.copy()
        state.update(_fs=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def fs(self):
        """This process's filesystem (a forked loader worker makes its own: not its parent's sockets)."""
        fs, pid = self._fs, self._pid
        if fs is None or pid != os.getpid():
            with self._lock:
                if self._fs is None or self._pid != os.getpid():
                    self._fs, self._pid = _filesystem(urlsplit(self.location).scheme, self.stall_s), os.getpid()
                fs = self._fs
        return fs

    def reset(self, failed) -> None:
        """A fresh connection pool after a failure (the old one may hold dead sockets), unless
        another thread has made one already."""
        with self._lock:
            if self._fs is failed:
                self._fs = None

    def url(self, name: str = "") -> str:
        if not name:
            return self.location
        return f"{self.location}/{name}" if self.remote else str(Path(self.location) / name)

    def shown(self, name: str = "") -> str:
        return redact(self.url(name))

    def call(self, what: str, name: str, action):
        """``action(fs)`` with retries; one line naming the URL when it cannot succeed."""
        deadline, delay = None, 0.5
        while True:
            failed = self.fs
            try:
                return action(failed)
            except (StoreError, AttributeError, TypeError, NotImplementedError):
                raise  # ours, or a bug: retrying will not help
            except Exception as exc:  # classified below: permanent, or retried until the deadline
                reason = _permanent(exc)
                if reason == "not found":
                    raise ObjectMissing(f"{self.shown(name)}: not found") from None
                if reason == "range":
                    raise RangeNotSatisfiable(f"{self.shown(name)}: the range is past its end") from None
                if reason:
                    raise StoreError(f"{self.shown(name)}: {reason}") from None
                now = time.monotonic()
                if deadline is None:
                    print(f"warning: {self.shown(name)}: {_cause(exc)}; retrying for up to {self.retry_s:g} s "
                          "(data.remote_retry_s)", file=sys.stderr, flush=True)
                deadline = deadline or now + self.retry_s
                if now >= deadline:
                    raise StoreUnavailable(f"{self.shown(name)}: the store did not answer for {self.retry_s:g} s "
                                           f"(data.remote_retry_s) while {what}; last error {_cause(exc)}") from None
                self.stats.retries += 1
                time.sleep(min(delay * (0.5 + random.random()), max(0.0, deadline - now)))
                delay = min(delay * 2, 10.0)
                self.reset(failed)

    def read(self, name: str) -> bytes:
        if not self.remote:
            return Path(self.url(name)).read_bytes()
        data = self.call("reading", name, lambda fs: fs.cat_file(self.url(name)))
        self.stats.requests += 1
        self.stats.bytes += len(data)
        return data

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        """Bytes ``start``..``stop - 1`` (one ranged GET); fewer where the object ends before ``stop``."""
        if not self.remote:
            with open(self.url(name), "rb") as f:
                return os.pread(f.fileno(), stop - start, start)
        try:
            data = self.call("reading", name, lambda fs: fs.cat_file(self.url(name), start=start, end=stop))
        except RangeNotSatisfiable:
            return b""  # the object ends before ``start``: the samples there are missing (a truncated shard)
        if len(data) > stop - start:
            raise StoreError(f"{self.shown(name)}: the server sent {len(data)} bytes for a range of {stop - start}: "
                             "it ignores range requests (Range: bytes=...), which reading shards needs")
        self.stats.requests += 1
        self.stats.bytes += len(data)
        return data

    def exists(self, name: str) -> bool:
        if not self.remote:
            return Path(self.url(name)).exists()
        self.stats.requests += 1
        try:
            self.call("checking", name, lambda fs: fs.info(self.url(name)))
        except FileNotFoundError:
            return False
        return True

    def size(self, name: str) -> int | None:
        if not self.remote:
            path = Path(self.url(name))
            return path.stat().st_size if path.is_file() else None
        self.stats.requests += 1
        try:
            return self.call("checking", name, lambda fs: fs.info(self.url(name)))["size"]
        except FileNotFoundError:
            return None

    def list(self, prefix: str = "") -> list[str]:
        """Names under ``prefix`` (a folder inside the location), relative to the location."""
        self.stats.requests += 1
        base = self.url(prefix).rstrip("/")
        try:
            found = self.call("listing", prefix, lambda fs: fs.ls(base, detail=False))
        except FileNotFoundError:
            return []
        root = urlsplit(self.location)
        stem = f"{root.netloc}{root.path}".rstrip("/") + "/"  # what fsspec's names start with
        return sorted(str(p).split(stem, 1)[-1] for p in found)

    def put_file(self, local: Path, name: str) -> None:
        if not self.remote:
            raise ValueError("put_file is for remote stores")
        self.stats.requests += 1
        self.call("uploading", name, lambda fs: fs.put_file(str(local), self.url(name)))

    def put_bytes(self, data: bytes, name: str) -> None:
        self.stats.requests += 1
        self.call("uploading", name, lambda fs: fs.pipe_file(self.url(name), data))

    def check_reachable(self) -> None:
        """Fail now, with one line, on wrong credentials or a missing bucket (before any work)."""
        if not self.remote:
            return
        parts = urlsplit(self.location)
        if parts.scheme in ("http", "https"):
            return  # no bucket: a missing object or a refused connection shows at the first read
        bucket = f"{parts.scheme}://{parts.netloc}"
        try:
            self.call("checking the bucket", "", lambda fs: fs.ls(bucket, detail=False))
        except FileNotFoundError:
            raise StoreError(f"{bucket}: the bucket does not exist (or these credentials cannot see it)") from None

"""Where a prepared dataset lives: a local folder, or an object store (``s3://``, ``gs://``,
``http(s)://``) read through fsspec.

A ``Store`` names files relative to the dataset's location and does the few things the
pipeline needs: read a whole small object, read a byte range, upload a file, test existence.
Local folders take the plain file API (the loader's hot path does not go through here).

Remote calls are retried with backoff for ``retry_s`` seconds when the store fails or stalls
(connection refused or reset, timeouts, 5xx answers); then ``StoreUnavailable`` names the URL
and the last cause. What retrying cannot fix fails at once with ``StoreError``: wrong
credentials (named as the scheme names them: AWS's, Google's, none for HTTPS), a missing
bucket or object. The clients' own retry loops are off for reads (a loop inside ours would
multiply the stall time), and every try uses the same filesystem. Uploads to S3 of more than
``UPLOAD_PART_BYTES`` go in parts, each retried alone. Credentials and endpoints come from
the standard places (AWS's environment variables and config files, ``AWS_ENDPOINT_URL`` for
S3-compatible stores; Google's application default credentials) and never appear in
messages: URLs are shown without user information or query strings.
"""
from __future__ import annotations

import errno
import functools
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
UPLOAD_PART_BYTES = 8 * 2**20  # S3 multipart uploads: the AWS CLI's part size and threshold (multipart_chunksize)


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


def _filesystem(scheme: str, stall_s: float = STALL_S, requester_pays: bool = False):
    """A fresh fsspec filesystem with short connect and stall timeouts: our own loop retries.
    ``requester_pays``: requests say that the reader pays (S3's and GCS's requester-pays buckets)."""
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
        from .credentials import aws_session  # it imports aiobotocore: the 'remote' extra

        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = fsspec.filesystem(
            "s3", skip_instance_cache=True, use_listings_cache=False, endpoint_url=endpoint or None,
            requester_pays=requester_pays,
            session=aws_session(),  # this process's credentials, looked up once (shards.credentials)
            config_kwargs={"connect_timeout": CONNECT_S, "read_timeout": stall_s, "retries": {"max_attempts": 0}})
        fs.retries = 1  # s3fs's own retry loop (a class attribute, not a constructor argument)
        return fs
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_S, sock_read=stall_s)
    if scheme in ("gs", "gcs"):
        logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # it logs each failure's traceback: ours is one line
        return _gcs_class()(skip_instance_cache=True, use_listings_cache=False, requests_timeout=timeout,
                            requester_pays=requester_pays)
    return fsspec.filesystem("http", skip_instance_cache=True, client_kwargs={"timeout": timeout})


@functools.cache
def _gcs_class():
    """gcsfs's JSON-API filesystem, whose reads are tried once.

    gcsfs retries each request itself, up to 6 times with sleeps of up to 32 s, a count fixed
    when it is imported: a stall would cost six stall times and half a minute before our loop
    saw it. Reads (GET) go to the request without that loop; uploads keep it, so that a failed
    chunk of a resumable upload is sent again alone. Not ``gcsfs.GCSFileSystem``, which by
    default first asks the Storage Control API over gRPC for each bucket's layout (for zonal
    buckets), with retries of up to a minute outside our timeouts."""
    from gcsfs.core import GCSFileSystem

    request_once = getattr(GCSFileSystem._request, "__wrapped__", None)  # under gcsfs's @retry_request
    if request_once is None:
        return GCSFileSystem

    class GCSFileSystemReadOnce(GCSFileSystem):
        async def _request(self, method, path, *args, **kwargs):
            if method.upper() == "GET":
                return await request_once(self, method, path, *args, **kwargs)
            return await super()._request(method, path, *args, **kwargs)

    return GCSFileSystemReadOnce


_warned_anonymous: set[str] = set()


def _warn_if_anonymous(fs, location: str) -> None:
    """Once per process and bucket: gcsfs found no Google credentials and reads anonymously."""
    parts = urlsplit(location)
    bucket = f"{parts.scheme}://{parts.netloc}"
    if getattr(getattr(fs, "credentials", None), "method", None) != "anon" or bucket in _warned_anonymous:
        return
    _warned_anonymous.add(bucket)
    print(f"warning: {bucket}: no Google credentials found (GOOGLE_APPLICATION_CREDENTIALS, "
          "'gcloud auth application-default login', or a GCE metadata server): requests are anonymous, "
          "which only public buckets answer", file=sys.stderr, flush=True)


def _access_denied(scheme: str, status: int | None) -> str:
    if scheme == "s3":
        return "access denied (check the credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    if scheme in ("gs", "gcs"):
        return (f"access denied ({status or 403}; check the Google credentials: GOOGLE_APPLICATION_CREDENTIALS "
                "or 'gcloud auth application-default login')")
    return f"access denied ({status or 403})"


def _http_status(exc: BaseException) -> int | None:
    """The answer's HTTP status (aiohttp's and fsspec's ``status``, gcsfs's ``HttpError.code``)."""
    for error in (exc, exc.__cause__):
        for attribute in ("status", "code"):
            value = getattr(error, attribute, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
    return None


def _s3_code(exc: BaseException) -> str:
    """botocore's error code of the answer (``"400"`` for a bare 400 without a body), or ""."""
    for error in (exc, exc.__cause__):
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


def _failed_token_refresh(exc: BaseException) -> bool:
    """A failed refresh of Google credentials that google-auth says may succeed if retried (the
    token service did not answer); gcsfs reports it as a 401 "Invalid Credentials"."""
    cause = exc.__cause__
    return type(cause).__name__ == "RefreshError" and bool(getattr(cause, "retryable", False))


DAMAGED_UPLOAD_CODES = ("IncompleteBody", "BadDigest", "XAmzContentSHA256Mismatch", "RequestTimeout")


def _permanent(exc: BaseException, scheme: str = "s3", uploading: bool = False) -> str | None:
    """Why ``exc`` will not go away by retrying (None: it may, retry). ``uploading``: ``exc``
    answered a request that carried a body."""
    text = f"{exc} {exc.__cause__ or ''}"
    if "InvalidRange" in text or "range not satisfiable" in text.lower() or "range is not satisfiable" in text:
        return "range"
    if isinstance(exc, FileNotFoundError) and isinstance(exc.__cause__, OSError):
        return None  # fsspec's http says "not found" for a HEAD that could not connect
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text or "NoSuchKey" in text:
        return "not found"
    s3_code, status = _s3_code(exc), _http_status(exc)
    if s3_code in DAMAGED_UPLOAD_CODES or (uploading and s3_code in ("400", "BadRequest")):
        return None  # the body arrived damaged or cut short (s3fs says EINVAL): sent again, it goes through
    if _failed_token_refresh(exc):
        return None
    if "requester pays" in text.lower() or "UserProjectMissing" in text:
        return "the bucket is requester-pays: set data.requester_pays=true (the reader's project is billed)"
    if status in (401, 403) or isinstance(exc, PermissionError) or any(code in text for code in (
            "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden")):
        return _access_denied(scheme, status)
    if "NoCredentialsError" in type(exc).__name__ or "Unable to locate credentials" in text:
        return "no credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run with an "\
            "instance or container role)"
    if status is not None and 400 <= status < 500 and status not in (408, 429):  # the request, not the store
        return f"refused ({status}: {_cause(exc)})"
    if isinstance(exc, OSError) and exc.errno in (errno.EINVAL, errno.EPERM, errno.EACCES, errno.ENOSYS):
        return f"refused ({_cause(exc)})"  # s3fs's translation of a 4xx answer (a wrong region, a bad token)
    if isinstance(exc, ValueError) and "Bad Request" in text:
        return f"refused ({_cause(exc)})"  # gcsfs's translation of a 400 that names something invalid
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
        """This process's filesystem (each loader worker makes its own: sockets and event loops do not cross processes)."""
        fs, pid = self._fs, self._pid
        if fs is None or pid != os.getpid():
            with self._lock:
                if self._fs is None or self._pid != os.getpid():
                    scheme = urlsplit(self.location).scheme
                    self._fs, self._pid = _filesystem(scheme, self.stall_s, self.requester_pays), os.getpid()
                    if scheme in ("gs", "gcs"):
                        _warn_if_anonymous(self._fs, self.location)
                fs = self._fs
        return fs

    def url(self, name: str = "") -> str:
        if not name:
            return self.location
        return f"{self.location}/{name}" if self.remote else str(Path(self.location) / name)

    def shown(self, name: str = "") -> str:
        return redact(self.url(name))

    def call(self, what: str, name: str, action):
        """``action(fs)`` with retries; one line naming the URL when it cannot succeed.

        Every try uses the same filesystem: its connection pool drops a dead connection by itself
        (aiohttp, under s3fs, gcsfs and fsspec's HTTP), and a new filesystem per try would mean a
        new credential look-up per try (on EC2, a call to the instance metadata service)."""
        deadline, delay = None, 0.5
        scheme = urlsplit(self.location).scheme
        while True:
            try:
                return action(self.fs)
            except (StoreError, AttributeError, TypeError, NotImplementedError):
                raise  # ours, or a bug: retrying will not help
            except Exception as exc:  # classified below: permanent, or retried until the deadline
                reason = _permanent(exc, scheme, uploading=what == "uploading")
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

    def read(self, name: str) -> bytes:
        if not self.remote:
            return Path(self.url(name)).read_bytes()
        data = self.call("reading", name, lambda fs: fs.cat_file(self.url(name)))
        self.stats.requests += 1
        self.stats.bytes += len(data)
        return data

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        """Bytes ``start``..``stop - 1`` (one ranged GET); fewer where the object ends before ``stop``.
        Over HTTP(S) an answer that is not that range (a server that ignores Range) is refused from
        its status and headers, before its body is read (``shards.ranged_read``)."""
        if not self.remote:
            with open(self.url(name), "rb") as f:
                return os.pread(f.fileno(), stop - start, start)
        from .ranged_read import RangeIgnored, read_http_range  # it imports fsspec: the 'remote' extra

        def ranged(fs) -> bytes:
            if urlsplit(self.location).scheme not in ("http", "https"):
                return fs.cat_file(self.url(name), start=start, end=stop)  # S3 and GCS honour ranges
            try:
                return read_http_range(fs, self.url(name), start, stop)
            except RangeIgnored as exc:  # not retried: the server answers the same every time
                raise StoreError(f"{self.shown(name)}: {exc}: it ignores range requests (Range: bytes=...), "
                                 "which reading shards needs") from None

        try:
            data = self.call("reading", name, ranged)
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
        if urlsplit(self.location).scheme == "s3" and Path(local).stat().st_size > UPLOAD_PART_BYTES:
            return self._put_in_parts(Path(local), name)
        self.call("uploading", name, lambda fs: fs.put_file(str(local), self.url(name)))

    def _put_in_parts(self, local: Path, name: str) -> None:
        """An S3 multipart upload whose parts are each retried alone (for ``retry_s``).

        s3fs's ``put_file`` gives a part the tries of any request (one: reads must not retry
        inside our loop) and aborts the whole upload when a part fails, so a failed part would
        restart the shard from its first byte; here the upload goes on from the failed part."""
        size = local.stat().st_size
        bucket, key, _ = self.fs.split_path(self.url(name))
        where = {"Bucket": bucket, "Key": key}
        upload_id = self.call("uploading", name, lambda fs: fs.call_s3("create_multipart_upload", **where))["UploadId"]
        parts = []
        try:
            with open(local, "rb") as f:
                for number, start in enumerate(range(0, size, UPLOAD_PART_BYTES), 1):
                    body = os.pread(f.fileno(), UPLOAD_PART_BYTES, start)
                    answer = self.call("uploading", name, lambda fs: fs.call_s3(
                        "upload_part", **where, UploadId=upload_id, PartNumber=number, Body=body))
                    parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            try:
                self.call("uploading", name, lambda fs: fs.call_s3(
                    "complete_multipart_upload", **where, UploadId=upload_id, MultipartUpload={"Parts": parts}))
            except ObjectMissing:  # a completion tried again after its answer was lost: the upload is done
                if self.size(name) != size:
                    raise
        except BaseException:
            try:  # leave no parts behind (S3 bills them) when the upload cannot finish
                self.fs.call_s3("abort_multipart_upload", **where, UploadId=upload_id)
            except Exception:
                pass
            raise

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
        prefix = parts.path.strip("/") + "/" if parts.path.strip("/") else ""

        def list_one(fs):  # inside the prefix: a bucket's policy may allow listing only there
            if parts.scheme == "s3":
                return fs.call_s3("list_objects_v2", Bucket=parts.netloc, Prefix=prefix, MaxKeys=1)
            return fs.call("GET", "b/{}/o", parts.netloc, prefix=prefix, maxResults=1, json_out=True)

        try:
            self.call("checking the bucket", "", list_one)
        except FileNotFoundError:
            raise StoreError(f"{bucket}: the bucket does not exist (or these credentials cannot see it)") from None

"""This process's AWS credentials for S3: looked up once, shared by its threads, its filesystems and
its loader workers, and refreshed by one thread before they expire.

Left to itself, s3fs makes every filesystem look its credentials up. With an instance role or
container credentials each look-up is a call to a metadata service: 8 ranks x 10 loader workers
make hundreds at once, the service throttles them, botocore's one-second, one-try fetch then finds
nothing, and the run stopped with "no credentials".

botocore's own chain finds them (environment variables, profiles, web identity, SSO, container and
instance metadata), so every source works as it does for the AWS CLI; keys in environment
variables need no call at all. A filesystem made with ``aws_session()`` signs with this process's
credentials. They are looked up again only if AWS's environment variables change, or after they
have expired.

Temporary credentials (they carry an expiry) are the looking-up process's to share: it answers
the processes it starts (loader workers, forked or from a fork server) on a local socket named in
``SHARE_ENV``, and they ask it again every ``BORROWED_S``, never the metadata service (unless it
has gone, or its AWS environment differs from theirs). One thread of that process refreshes them
at a moment of its own 11 to 14.5 minutes before they expire (inside botocore's 15-minute advisory
window, before its 10-minute mandatory one) while requests go on with the current ones; a failed
refresh is tried again 15 to 60 s later.

A look-up that finds nothing although an instance metadata service accepts connections was
refused or too slow (throttling): ``CredentialsUnavailable``, a ``ConnectionError`` that the store
retries like any failure of the store. With nothing listening there, no credentials are
configured anywhere: botocore's ``NoCredentialsError``, at once.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import socket
import struct
import sys
import threading
import time
import uuid
from urllib.parse import urlsplit

import botocore.session
from aiobotocore.credentials import AioCredentialResolver, AioCredentials
from aiobotocore.session import AioSession
from botocore.credentials import CredentialProvider, ReadOnlyCredentials, RefreshableCredentials
from botocore.exceptions import NoCredentialsError
from botocore.utils import InstanceMetadataFetcher, resolve_imds_endpoint_mode

REFRESH_LEAD_S = (11 * 60, 14.5 * 60)  # a process refreshes at a random moment this long before the expiry
REFRESH_CHECK_S = 10.0  # how often the refreshing thread looks at the time left
REFRESH_RETRY_S = (15.0, 60.0)  # after a refresh that failed (or did not get past the lead), the next try
BORROWED_S = 60.0  # a process that asked for its credentials asks again after this long
SHARE_ENV = "SHARDS_AWS_CREDENTIALS_SOCKET"  # the sharing process's socket (Linux's abstract namespace)
ANSWER_S = 60.0  # how long an asking process waits for the answer (the sharer may be looking them up)
REFRESHER = "aws-credentials-refresh"


class CredentialsUnavailable(ConnectionError):
    """A credential source exists but gave nothing this time (throttled, or too slow): retry."""


class LookedUp:
    """Credentials that botocore's chain found in this process (``source``), their current copy."""

    def __init__(self, source, environment: tuple):
        self.source = source
        self.environment = environment  # AWS's environment variables when they were looked up
        self.frozen: ReadOnlyCredentials = source.get_frozen_credentials()
        self.pid = os.getpid()

    @classmethod
    def look_up(cls, environment: tuple) -> LookedUp:
        session = botocore.session.Session()
        source = session.get_credentials()
        if source is None:
            url = _answering_metadata_service(session)
            if url:
                raise CredentialsUnavailable(
                    f"no credentials from the instance metadata service at {url}, which accepts connections "
                    "(throttled, or slower than AWS_METADATA_SERVICE_TIMEOUT)")
            raise NoCredentialsError()
        return cls(source, environment)

    @property
    def temporary(self) -> bool:
        return isinstance(self.source, RefreshableCredentials)

    def stale(self) -> bool:
        return self.temporary and self.source.refresh_needed(0)  # expired: the refreshes all failed

    def keep_fresh(self) -> None:
        """Temporary credentials: refresh them in a thread, and share them with the processes
        this one starts."""
        if self.temporary:
            threading.Thread(target=self._refresh_until_replaced, name=REFRESHER, daemon=True).start()
            _share()

    def _refresh_until_replaced(self) -> None:
        lead = random.uniform(*REFRESH_LEAD_S)  # processes refresh at moments of their own
        while True:
            time.sleep(REFRESH_CHECK_S)
            if _current is not self:
                return  # looked up again (expired, or other AWS settings)
            if not self.source.refresh_needed(lead):
                continue
            _refresh_failure.cause = None
            try:
                self.frozen = self.source.get_frozen_credentials()  # botocore's refresh: this thread's look-up
            except Exception as exc:  # raised in botocore's mandatory window; logged in its advisory one
                _refresh_failure.cause = exc
            if self.source.refresh_needed(lead):  # not refreshed, or given no longer than the lead
                cause = _refresh_failure.cause
                if cause is not None:
                    print(f"warning: refreshing the AWS credentials ({self.source.method}) failed: "
                          f"{type(cause).__name__}: {' '.join(str(cause).split())}; the current ones are used "
                          "until they expire", file=sys.stderr, flush=True)
                time.sleep(random.uniform(*REFRESH_RETRY_S))


class Borrowed:
    """Credentials asked of the process that looked them up (a loader worker's, of its trainer)."""

    def __init__(self, frozen: ReadOnlyCredentials, environment: tuple):
        self.frozen = frozen
        self.environment = environment
        self.pid = os.getpid()
        self.asked_at = time.monotonic()

    def stale(self) -> bool:
        return time.monotonic() - self.asked_at > BORROWED_S

    def keep_fresh(self) -> None:
        pass  # by asking again once stale


def _answering_metadata_service(session) -> str | None:
    """The instance metadata service's URL where it is enabled and accepts a connection."""
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "false").lower() == "true":
        return None
    url = InstanceMetadataFetcher(config={
        "ec2_metadata_service_endpoint": session.get_config_variable("ec2_metadata_service_endpoint"),
        "ec2_metadata_service_endpoint_mode": resolve_imds_endpoint_mode(session)}).get_base_url()
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=float(
                session.get_config_variable("metadata_service_timeout"))):
            return url
    except OSError:  # refused, unreachable, or no answer: nothing there
        return None


class _RefreshFailures(logging.Filter):
    """botocore logs a failed advisory refresh with its traceback: the refresher says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.threadName != REFRESHER:
            return True
        if record.exc_info:
            _refresh_failure.cause = record.exc_info[1]
        return False


_current: LookedUp | Borrowed | None = None
_lock = threading.Lock()
_refresh_failure = threading.local()
_sharing: tuple[int, socket.socket] | None = None  # (pid, listening socket) of this process's sharing
logging.getLogger("botocore.credentials").addFilter(_RefreshFailures())


def _after_fork_in_child() -> None:
    global _lock, _current, _sharing
    _lock = threading.Lock()  # a fork taken during another thread's look-up must not inherit it held
    _current = None  # borrowed from the parent where it shares them, else looked up (keys in the environment)
    if _sharing is not None:
        _sharing[1].close()  # the parent's: with it open here, an asking process would wait on no one
        _sharing = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _environment() -> tuple:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))


def _fingerprint(environment: tuple) -> str:
    return hashlib.sha256(repr(environment).encode()).hexdigest()


def current_credentials() -> ReadOnlyCredentials:
    """This process's credentials: looked up (or asked of the process that shares them) on the
    first call, blocking meanwhile; then the current copy."""
    global _current
    environment = _environment()
    with _lock:
        if _current is None or _current.pid != os.getpid() or _current.environment != environment or _current.stale():
            _current = None
            _current = _borrow(environment) or LookedUp.look_up(environment)
            _current.keep_fresh()
        return _current.frozen


def _ready() -> ReadOnlyCredentials | None:
    """The current credentials where nothing needs doing first."""
    found = _current
    if found is None or found.pid != os.getpid() or found.environment != _environment() or found.stale():
        return None
    return found.frozen


# -- sharing with the processes this one starts ---------------------------------------------------
def _share() -> None:
    """Answer this process's children on a local socket (once), named in their environment."""
    global _sharing
    if _sharing is not None or not sys.platform.startswith("linux"):
        return  # sharing, or no abstract socket namespace (each process looks up its own)
    name = f"googlenet-aws-credentials-{uuid.uuid4().hex}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + name)
    listener.listen(128)
    _sharing = (os.getpid(), listener)
    os.environ[SHARE_ENV] = name  # not AWS_*: the environment's fingerprint stays the same
    threading.Thread(target=_answer_forever, args=(listener,), name="aws-credentials-share", daemon=True).start()


def _answer_forever(listener: socket.socket) -> None:
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:
            return  # closed
        with connection:
            try:
                _, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                      struct.calcsize("3i")))
                if uid != os.getuid():
                    continue  # another user's process: credentials are not theirs to have
                connection.settimeout(ANSWER_S)
                with connection.makefile("r") as reader:
                    asked = reader.readline().strip()
                connection.sendall(json.dumps(_answer(asked)).encode() + b"\n")
            except OSError:
                continue  # the asking process gave up or ended


def _answer(fingerprint: str) -> dict:
    environment = _environment()
    if fingerprint != _fingerprint(environment):
        return {"other": "its AWS environment variables are not the asking process's"}
    try:
        frozen = current_credentials()
    except NoCredentialsError:
        return {"missing": True}
    except Exception as exc:  # a refusal or time-out of the source: the asking process retries
        return {"unavailable": f"{type(exc).__name__}: {exc}"}
    return {"credentials": [frozen.access_key, frozen.secret_key, frozen.token]}


def _borrow(environment: tuple) -> Borrowed | None:
    """The credentials of the process named in ``SHARE_ENV``; None where there is none (or it
    has gone, or has other AWS settings): then this process looks them up itself."""
    name = os.environ.get(SHARE_ENV)
    if not name or (_sharing is not None and _sharing[0] == os.getpid()):
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        try:
            connection.settimeout(ANSWER_S)
            connection.connect("\0" + name)
        except OSError:
            return None  # it has ended
        try:
            connection.sendall(_fingerprint(environment).encode() + b"\n")
            with connection.makefile("r") as reader:
                answer = json.loads(reader.readline() or "{}")
        except (OSError, ValueError) as exc:
            raise CredentialsUnavailable(f"the process sharing its AWS credentials did not answer ({exc})") from None
    if "credentials" in answer:
        return Borrowed(ReadOnlyCredentials(*answer["credentials"]), environment)
    if "missing" in answer:
        raise NoCredentialsError()
    if "unavailable" in answer:
        raise CredentialsUnavailable(f"the process sharing its AWS credentials has none now: {answer['unavailable']}")
    return None


# -- what aiobotocore asks ----------------------------------------------------------------------
async def _frozen() -> ReadOnlyCredentials:
    return _ready() or await asyncio.to_thread(current_credentials)  # a look-up blocks: not on the event loop


class _ThisProcessCredentials(AioCredentials):
    """What aiobotocore signs each request with: the process's current credentials."""

    def __init__(self):
        super().__init__("", "", method=_ThisProcess.METHOD)

    async def get_frozen_credentials(self) -> ReadOnlyCredentials:
        return await _frozen()


class _ThisProcess(CredentialProvider):
    METHOD = "this-process"

    async def load(self):
        await _frozen()  # a failed look-up shows when the client is made
        return _ThisProcessCredentials()


def aws_session() -> AioSession:
    """An aiobotocore session (for ``s3fs.S3FileSystem(session=...)``) whose credentials are this
    process's; region and other settings come from the usual places."""
    session = AioSession()
    session.register_component("credential_provider", AioCredentialResolver([_ThisProcess()]))
    return session

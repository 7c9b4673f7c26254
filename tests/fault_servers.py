"""Local servers that misbehave on purpose, for the tests of the stores' clients (gcsfs, s3fs and
botocore, fsspec's HTTP) against faults a real service shows now and then.

``FakeGCS``: the part of Google Cloud Storage's JSON API that gcsfs uses to read (object
metadata, listings, ``alt=media`` downloads with ``Range``), with a ``fault`` switched at any time: ``"stall"`` (headers and a few bytes of each answer, then
silence), ``"unauthorized"`` (401 unless a bearer token comes, as GCS answers an anonymous
caller), ``"forbidden"`` (403), ``"requester-pays"`` (400 unless the request names a
``userProject``). Point gcsfs at it with ``STORAGE_EMULATOR_HOST=server.url``.

``S3Proxy``: a proxy in front of an S3 server (moto) that forwards requests unchanged (their
signatures stay valid) and can refuse every request outside one prefix, as a shared bucket's
policy does, and fail an UploadPart once per part number (``IncompleteBody``, or a dropped
connection). It logs what it forwarded, so that tests count uploads per key.

``RefusingServer``: answers every request with one status (an HTTPS server that says 403).

Every server runs in threads of the test process on 127.0.0.1 and a free port; ``close()`` it.
"""
from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "te", "trailer", "upgrade",
               "proxy-connection", "content-length"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that hung up: not the test's concern
        pass


class ThreadedServer:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 in a thread, with a log of one line per request."""

    def __init__(self):
        self.released = threading.Event()  # set at close: stalled answers end
        self._log: list[str] = []
        self._lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), self._handler_class())
        self.httpd.owner = self
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def record(self, line: str) -> None:
        with self._lock:
            self._log.append(line)

    def requests(self) -> list[str]:
        with self._lock:
            return list(self._log)

    def close(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for botocore's uploads
    disable_nagle_algorithm = True

    def log_message(self, format, *args):
        pass

    @property
    def owner(self):
        return self.server.owner

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def answer(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "") -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


# ------------------------------------------------------------------------------------------- GCS
class FakeGCS(ThreadedServer):
    """Objects (``put("bucket/name", data)``) served as GCS's JSON API serves them to gcsfs."""

    TOKEN = "test-access-token"

    def __init__(self):
        self.objects: dict[str, bytes] = {}
        self.fault: str | None = None
        super().__init__()

    def put(self, path: str, data: bytes) -> None:
        self.objects[path] = data

    def _handler_class(self):
        return _GCSHandler


def _gcs_error(code: int, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message, "errors": [{"message": message}]}}).encode()


class _GCSHandler(_Handler):
    def do_GET(self):
        gcs: FakeGCS = self.owner
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = unquote(parts.path)
        bearer = self.headers.get("Authorization", "") == f"Bearer {gcs.TOKEN}"
        gcs.record(f"GET {self.path} {'token' if bearer else 'anonymous'}")
        if gcs.fault == "stall":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"{")
            self.wfile.flush()
            gcs.released.wait()  # nothing more until the server closes
            self.close_connection = True
            return
        if gcs.fault == "unauthorized" and not bearer:
            return self.answer(401, _gcs_error(401, "Anonymous caller does not have storage.objects.get access to "
                                                    "the Google Cloud Storage object."), content_type="application/json")
        if gcs.fault == "forbidden":
            return self.answer(403, _gcs_error(403, "caller does not have storage.objects.get access"),
                               content_type="application/json")
        if gcs.fault == "requester-pays" and "userProject=" not in parts.query:
            return self.answer(400, _gcs_error(400, "Bucket is a requester pays bucket but no user project "
                                                    "provided."), content_type="application/json")
        for prefix in ("/download/storage/v1/b/", "/storage/v1/b/"):
            if path.startswith(prefix):
                bucket, _, rest = path[len(prefix):].partition("/")
                break
        else:
            return self.answer(404, _gcs_error(404, "Not Found"), content_type="application/json")
        if rest == "o":
            return self._list(bucket, query)
        name = rest[len("o/"):]
        data = gcs.objects.get(f"{bucket}/{name}")
        if data is None:
            return self.answer(404, _gcs_error(404, f"No such object: {bucket}/{name}"),
                               content_type="application/json")
        if query.get("alt") == "media":
            return self._media(data)
        self.answer(200, json.dumps(self._metadata(bucket, name, data)).encode(), content_type="application/json")

    @staticmethod
    def _metadata(bucket: str, name: str, data: bytes) -> dict:
        return {"kind": "storage#object", "bucket": bucket, "name": name, "size": str(len(data)),
                "generation": "1", "metageneration": "1", "updated": "2026-01-01T00:00:00.000Z",
                "timeCreated": "2026-01-01T00:00:00.000Z", "contentType": "application/octet-stream"}

    def _list(self, bucket: str, query: dict) -> None:
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        items, prefixes = [], set()
        for path, data in sorted(self.owner.objects.items()):
            b, _, name = path.partition("/")
            if b != bucket or not name.startswith(prefix):
                continue
            if delimiter and delimiter in name[len(prefix):]:
                prefixes.add(prefix + name[len(prefix):].split(delimiter)[0] + delimiter)
            else:
                items.append(self._metadata(bucket, name, data))
        items = items[:int(query.get("maxResults", 1000))]
        listing = {"kind": "storage#objects", "items": items, "prefixes": sorted(prefixes)}
        self.answer(200, json.dumps(listing).encode(), content_type="application/json")

    def _media(self, data: bytes) -> None:
        span = self.headers.get("Range", "")
        if span.startswith("bytes="):
            first, _, last = span[len("bytes="):].partition("-")
            start, stop = int(first), min(int(last) + 1 if last else len(data), len(data))
            if start >= len(data):
                return self.answer(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            return self.answer(206, data[start:stop], {"Content-Range": f"bytes {start}-{stop - 1}/{len(data)}"},
                               "application/octet-stream")
        self.answer(200, data, content_type="application/octet-stream")


# -------------------------------------------------------------------------------------------- S3
class S3Proxy(ThreadedServer):
    """Forwards to ``target`` (an S3 endpoint URL). ``allow_prefix``: ``"bucket/prefix/"``; a
    request for another key, a listing of another prefix, or a bucket-wide request is refused with
    403 AccessDenied. ``part_faults``: ``{part_number: "incomplete-body" | "drop"}``, each done to
    the first UploadPart of that number only."""

    def __init__(self, target: str, allow_prefix: str | None = None, part_faults: dict[int, str] | None = None):
        parts = urlsplit(target)
        self.target = (parts.hostname, parts.port)
        self.allow_prefix = allow_prefix
        self.part_faults = dict(part_faults or {})
        self.entries: list[dict] = []
        super().__init__()

    def _handler_class(self):
        return _ProxyHandler

    def allowed(self, path: str, query: dict) -> bool:
        if self.allow_prefix is None:
            return True
        bucket, _, key = unquote(path).lstrip("/").partition("/")
        if key:
            return f"{bucket}/{key}".startswith(self.allow_prefix)
        listing_prefix = query.get("prefix")
        return listing_prefix is not None and f"{bucket}/{listing_prefix}".startswith(self.allow_prefix)

    def completed_uploads(self) -> dict[str, int]:
        """Key: how many uploads of it completed (a PutObject or a CompleteMultipartUpload that succeeded)."""
        counts: dict[str, int] = {}
        for e in self.entries:
            whole = e["method"] == "PUT" and "partNumber" not in e["query"]
            finished = e["method"] == "POST" and "uploadId" in e["query"]
            if (whole or finished) and 200 <= e["status"] < 300:
                counts[e["key"]] = counts.get(e["key"], 0) + 1
        return counts


class _ProxyHandler(_Handler):
    def _forward(self):
        proxy: S3Proxy = self.owner
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        body = self.body() if self.command in ("PUT", "POST") else None
        entry = {"method": self.command, "key": unquote(parts.path).lstrip("/"), "query": query,
                 "payer": self.headers.get("x-amz-request-payer", ""), "status": 0}
        proxy.entries.append(entry)
        if not proxy.allowed(parts.path, query):
            entry["status"] = 403
            error = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code>"
                     b"<Message>Access Denied</Message></Error>")
            return self.answer(403, error, content_type="application/xml")
        fault = proxy.part_faults.pop(int(query["partNumber"]), None) if "partNumber" in query else None
        if fault == "drop":
            entry["status"] = -1
            self.close_connection = True  # hang up without an answer
            return
        if fault == "incomplete-body":
            entry["status"] = 400
            error = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>IncompleteBody</Code><Message>You did not "
                     b"provide the number of bytes specified by the Content-Length HTTP header</Message></Error>")
            return self.answer(400, error, content_type="application/xml")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*proxy.target, timeout=120)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)  # Host kept: the signature holds
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        entry["status"] = response.status
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP | {"date", "server"}:
                self.send_header(key, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


# ------------------------------------------------------------------------------------------ HTTP
class RefusingServer(ThreadedServer):
    """Every request answered with ``status`` (and logged)."""

    def __init__(self, status: int):
        self.status = status
        super().__init__()

    def _handler_class(self):
        return _RefusingHandler


class _RefusingHandler(_Handler):
    def _refuse(self):
        self.owner.record(f"{self.command} {self.path}")
        self.answer(self.owner.status, b"no\n", content_type="text/plain")

    do_GET = do_HEAD = _refuse


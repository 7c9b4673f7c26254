"""One ranged GET over HTTP(S) that reads no more than the range asked for.

fsspec's HTTP ``cat_file`` reads an answer's whole body before its status can be looked at, so
a server that ignores ``Range`` (it answers 200 with the whole object) would be found only
after a whole shard sat in memory, once for each read in flight. Here the status line and
headers are checked first: a 200 to a range that does not start at 0, a Content-Range that
starts elsewhere or ends later, a Content-Length over the range end the read before its body
is read; a body is read up to the range's length and no further. The request goes through the
filesystem's own aiohttp session on its own event loop, so it shares that filesystem's
connection pool and timeouts (S3 and GCS always honour ranges: their readers are not this).
"""
from __future__ import annotations

import re

from fsspec.asyn import sync

CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class RangeIgnored(Exception):
    """The answer is not the range asked for; the message says what came instead."""


def read_http_range(fs, url: str, start: int, stop: int) -> bytes:
    """Bytes ``start``..``stop - 1`` of ``url`` through ``fs`` (fsspec's HTTPFileSystem); fewer
    where the object ends before ``stop``. Raises RangeIgnored before the body is read when the
    answer is not that range, FileNotFoundError on a 404, and aiohttp's ClientResponseError on
    any other error status (416 included), also without reading the body."""
    if stop <= start:
        return b""
    return sync(fs.loop, read_range_async, fs, url, start, stop)


async def read_range_async(fs, url: str, start: int, stop: int) -> bytes:
    options = dict(fs.kwargs)  # the filesystem's request options, as its own calls pass them
    asked = f"bytes={start}-{stop - 1}"
    # identity: a range of the stored bytes, not of a compressed form of them
    headers = {**options.pop("headers", {}), "Range": asked, "Accept-Encoding": "identity"}
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **options) as response:
        if response.status == 404:
            raise FileNotFoundError(url)
        response.raise_for_status()
        wrong = not_the_range(response.status, response.headers, start, stop)
        if wrong:
            raise RangeIgnored(f"the server answered {wrong} to {asked}")
        return await read_at_most(response.content, stop - start, asked)


def not_the_range(status: int, headers, start: int, stop: int) -> str | None:
    """What the answer is instead of the range asked for, judged by its status and headers;
    None when it is that range, or may be (a length not given: the body is read up to the range)."""
    length = headers.get("Content-Length", "")
    length = int(length) if length.isdigit() else None
    if status == 206:
        given = CONTENT_RANGE.fullmatch(headers.get("Content-Range", "").strip())
        if given and (int(given[1]) != start or int(given[2]) >= stop):
            return f"206 with bytes {given[1]}-{given[2]}"
        if length is not None and length > stop - start:
            return f"206 with {length} bytes"
        return None
    if status == 200 and start == 0 and (length is None or length <= stop - start):
        return None  # the whole object is the range asked for (or ends before it)
    if status == 200:
        return f"200 with the whole object ({length if length is not None else 'unknown'} bytes)"
    return str(status)  # another success (204, an unfollowed redirect): not the bytes asked for


async def read_at_most(content, limit: int, asked: str) -> bytes:
    """A body of at most ``limit`` bytes; a longer one is refused once its first extra byte arrives."""
    chunks, size = [], 0
    while chunk := await content.read(limit - size + 1):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise RangeIgnored(f"the server sent more than the {limit} bytes of {asked}")
    return b"".join(chunks)

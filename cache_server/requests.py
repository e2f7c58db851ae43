"""What a client may send the cache server: request bodies within limits, byte ranges, and the
typed error a handler raises to answer 4xx/5xx (docs/protocol.md §3 and §5)."""
from __future__ import annotations

import asyncio
import re
from urllib.parse import unquote

from aiohttp import web

# Request bodies, per route (each enforced while reading, before the body is in memory) and in
# total across requests: a client without a token can make the server hold at most BATCH_BODY.
BATCH_BODY = 128 * 1024  # batch.MAX_DIGESTS digests as JSON fit in ~77 KiB
TAG_BODY = 256
LEASE_BODY = 4096
BODIES_IN_FLIGHT = 256 * 1024 * 1024
BODY_TIMEOUT = 60.0  # seconds for a whole request body to arrive
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None,
                 close: bool = False):
        """``close``: end the connection after the answer (a body left unread must not be
        drained, nor the next request parsed out of it)."""
        super().__init__(message)
        self.status, self.headers, self.close = status, headers or {}, close


def error_response(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def climbs(raw_path: str) -> bool:
    """Whether the path as sent (before normalisation) tries to climb: '../x' is a bad digest,
    not a request for '/v1/x'."""
    return any(seg in (".", "..") for seg in unquote(raw_path.split("?", 1)[0]).split("/"))


class Bodies:
    """Reads request bodies for one server: each within its route's limit, all of them together
    within BODIES_IN_FLIGHT (one event loop, so a plain counter)."""

    def __init__(self) -> None:
        self.in_flight = 0

    async def read(self, request: web.Request, limit: int) -> bytes:
        """The request body, refused with 413 as soon as it is known to exceed ``limit`` (by
        its Content-Length, or while reading it), with 408 if it does not arrive within
        BODY_TIMEOUT, and with 503 while BODIES_IN_FLIGHT are being read already. Bytes are
        counted against BODIES_IN_FLIGHT as they arrive, not as declared: connections that
        declare 8 MiB and send nothing must not take the room of bodies that do arrive. A
        compressed body is refused (415): the server never inflates what a client sends (the
        server's aiohttp does not either: auto_decompress is off), as a small one can inflate
        to gigabytes before any limit or token is looked at."""
        declared = request.content_length
        if declared is not None and declared > limit:
            raise HttpError(413, f"body of {declared} bytes exceeds this route's {limit}",
                            close=True)
        if request.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
            raise HttpError(415, "compressed request bodies are not accepted (send the bytes as "
                            "they are; blocks are compressed already)", close=True)
        reserved = 0
        buf = bytearray()
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                async for chunk in request.content.iter_chunked(1 << 16):
                    buf += chunk
                    if len(buf) > limit:
                        raise HttpError(413, f"body exceeds this route's {limit} bytes", close=True)
                    # Room is reserved as the bytes arrive, not as declared.
                    if self.in_flight + len(chunk) > BODIES_IN_FLIGHT:
                        raise HttpError(503, "server busy reading other bodies; retry "
                                        "shortly", {"Retry-After": "1"}, close=True)
                    self.in_flight += len(chunk)
                    reserved += len(chunk)
        except TimeoutError:
            raise HttpError(408, f"the body did not arrive within {BODY_TIMEOUT:.0f} s",
                            close=True) from None
        finally:
            self.in_flight -= reserved
        return bytes(buf)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, stop) of a ``Range: bytes=A-B`` header (one range; ``A-``, ``-N`` suffixes), None
    without one. Anything else, multi-range, reversed, empty (``-0``) or past the end, is 416:
    the same answer whether the object is served from the cache or from memory."""
    if header is None:
        return None
    m = _RANGE_RE.fullmatch(header.strip())
    unsatisfiable = HttpError(416, f"range not satisfiable for {size} bytes: {header[:80]!r}",
                              {"Content-Range": f"bytes */{size}"})
    if m is None or not (m[1] or m[2]):
        raise unsatisfiable
    if m[1]:
        start = int(m[1])
        stop = int(m[2]) + 1 if m[2] else size
    else:
        start, stop = size - int(m[2]), size
        if int(m[2]) == 0:
            raise unsatisfiable
    start, stop = max(start, 0), min(stop, size)
    if start >= stop:
        raise unsatisfiable
    return start, stop

"""Reading a registry's answers: the progress rule every read is held to (:class:`Pace`),
bounded bodies, retries with backoff, and :class:`BlobReader`, which streams a blob and resumes
it with a Range request when the connection breaks (docs/registry.md)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, BinaryIO

import urllib3

from lazyfs.errors import BlobSizeMismatch, DownloadStalled, NotAnImage, RegistryError

from imagebuilder.sources.model import DownloadLimits

if TYPE_CHECKING:
    from imagebuilder.sources.registry import Registry

# One request is tried this many times on a connection error or a 429/5xx, and a blob download
# resumes this many times in a row without progress, waiting BACKOFF_FIRST·2ⁿ (at most
# BACKOFF_MAX) seconds between tries: about 12 s in all, long enough for a registry restart.
RETRIES = 6
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 4.0
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
READ_SIZE = 1 << 20


def backoff(attempt: int) -> float:
    return min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** attempt))


def reason(exc: Exception) -> str:
    """'[Errno 111] Connection refused' rather than urllib3's whole wrapped repr."""
    text = str(getattr(exc, "reason", None) or exc)
    return text.rpartition("): ")[2] if "): " in text else text


def release(resp: urllib3.BaseHTTPResponse, complete: bool) -> None:
    """Hand the connection back for reuse only when its body was read to the end; otherwise
    close it, so no later request reads what is left of this answer."""
    resp.release_conn() if complete else resp.close()


class Pace:
    """The progress rule of one download (docs/registry.md, "Slow and stalled downloads").

    Time is counted on the download's own clock, which runs only while the build waits on the
    registry (connecting, reading, backing off before a resume): a build that is slow to consume
    the bytes (compressing on a busy machine) never counts against the registry. The download
    fails with DownloadStalled when no byte has come for ``limits.stall`` seconds of that clock,
    resumes included, or when a window of ``limits.window`` seconds brought fewer than
    ``limits.min_rate`` bytes a second (or, near the end, fewer than were left): a read timeout
    alone never trips on a registry that trickles a byte now and then."""

    def __init__(self, limits: DownloadLimits, what: str, digest: str | None = None,
                 left: int | None = None):
        self.limits, self.what, self.digest = limits, what, digest
        self.clock = 0.0  # seconds spent waiting on the registry for this download
        self.last_byte = 0.0  # the clock when a byte last came
        self.window_start, self.window_got = 0.0, 0
        self.window_need = self._need(left)

    def _need(self, left: int | None) -> int:
        need = int(self.limits.min_rate * self.limits.window)
        return need if left is None else min(need, left)

    def read_timeout(self) -> float:
        """How long the next wait may last before the stall timeout is spent."""
        return max(0.01, self.limits.stall - (self.clock - self.last_byte))

    def stalled(self, offset: int) -> DownloadStalled:
        return DownloadStalled(f"{self.what}: no data for {self.limits.stall:g} s at byte {offset} "
                               f"(stall timeout)", self.digest)

    def account(self, seconds: float, got: int, offset: int, left: int | None) -> None:
        """One wait of ``seconds`` that brought ``got`` bytes, the download at ``offset`` with
        ``left`` bytes to come (None: unknown); raises DownloadStalled when the rule is broken."""
        self.clock += seconds
        if got:
            self.last_byte = self.clock
            self.window_got += got
        if self.clock - self.last_byte >= self.limits.stall:
            raise self.stalled(offset)
        elapsed = self.clock - self.window_start
        if elapsed >= self.limits.window:
            if self.window_got < self.window_need:
                raise DownloadStalled(f"{self.what}: {self.window_got} bytes in {elapsed:.0f} s at byte "
                                      f"{offset}, under the minimum rate of {self.limits.min_rate} "
                                      f"bytes/s", self.digest)
            self.window_start, self.window_got, self.window_need = self.clock, 0, self._need(left)

    def read1(self, resp: urllib3.BaseHTTPResponse, n: int, offset: int, left: int | None) -> bytes:
        """At most ``n`` bytes, whatever one read of the socket brings (a full-size read would
        wait for all of them, and a byte every few seconds would keep it waiting forever)."""
        conn = resp.connection
        if conn is not None and conn.sock is not None:
            # The wait may last what is left of the stall timeout, not a whole one again.
            conn.sock.settimeout(self.read_timeout())
        began = time.monotonic()
        try:
            data = resp.read1(n)
        except urllib3.exceptions.ReadTimeoutError:
            raise self.stalled(offset) from None  # the socket waited out the stall timeout
        except urllib3.exceptions.HTTPError:
            self.account(time.monotonic() - began, 0, offset, left)  # a break costs time too
            raise
        self.account(time.monotonic() - began, len(data), offset + len(data), left)
        return data


def read_body(resp: urllib3.BaseHTTPResponse, limit: int, pace: Pace) -> bytes:
    """An answer's body, or its first ``limit + 1`` bytes when it is longer (the caller refuses
    it); never more is read or held, and the connection is freed either way."""
    parts, got, complete = [], 0, False
    try:
        while got <= limit:
            data = pace.read1(resp, min(READ_SIZE, limit + 1 - got), got, None)
            if not data:
                complete = True
                break
            parts.append(data)
            got += len(data)
    finally:
        release(resp, complete)
    return b"".join(parts)


def _length(resp: urllib3.BaseHTTPResponse) -> int | None:
    text = resp.headers.get("Content-Length") or ""
    return int(text) if text.isdigit() else None


class BlobReader:
    """A blob as a file to read once, front to back. Breaks are resumed with a Range request;
    a registry that ignores Range sends the whole blob again and the part already read is skipped.

    With a declared size the blob must be exactly that long: an answer whose length says
    otherwise is refused before its body is read, and one of unknown length is read no further
    than the size, then made to end there. Every read is held to the progress rule (Pace)."""

    def __init__(self, registry: Registry, digest: str, size: int | None):
        self.registry = registry
        self.digest = digest
        self.size = size
        self.declared = size is not None
        self.offset = 0
        self.resumes = 0  # how many times a broken download was picked up again
        self.resp: urllib3.BaseHTTPResponse | None = None
        self.skip = 0  # bytes of the answer to throw away: a 200 to a resume sends them again
        self.complete = False  # the answer was read to its end, so its connection can be reused
        self.path = f"/v2/{registry.ref.repo}/blobs/{digest}"
        self.what = f"{registry.ref.host}/{registry.ref.repo}: blob"
        self.pace = Pace(registry.limits, f"{self.what} {digest}", digest, size)

    def _left(self) -> int | None:
        return None if self.size is None else self.size - self.offset

    def _mismatch(self, actual: str) -> BlobSizeMismatch:
        self._drop()
        return BlobSizeMismatch(self.what, self.digest, self.size, f"the registry sends {actual}")

    def _start(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        resp = self.registry.request("GET", self.path, headers, ok=(200, 206),
                                     timeout=self.pace.read_timeout())
        if resp.status == 404:
            resp.close()  # its body unread
            raise NotAnImage(f"{self.registry.ref.host}/{self.registry.ref.repo}: blob {self.digest} is missing")
        self.resp, self.skip, length = resp, self.offset, _length(resp)
        if resp.status == 206:
            span, _, total = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").partition("/")
            if span.split("-")[0] != str(self.offset):
                self._drop()
                raise RegistryError(f"{self.registry.ref.host}: blob {self.digest}: asked for bytes "
                                    f"{self.offset}-, got {resp.headers.get('Content-Range')!r}", self.digest)
            self.skip = 0
            if self.declared and total.isdigit() and int(total) != self.size:
                raise self._mismatch(f"{total} bytes")
            if self.declared and length is not None and length != self.size - self.offset:
                raise self._mismatch(f"{self.offset + length} bytes")
        elif self.size is None:
            self.size = length
        elif length is not None and length != self.size:
            raise self._mismatch(f"{length} bytes")  # refused before a byte of it is read

    def _read1(self, n: int) -> bytes:
        """What one read of the answer brings (at most n bytes), resuming a broken download."""
        breaks = 0
        while True:
            try:
                if self.resp is None:
                    began = time.monotonic()
                    try:
                        if breaks:
                            time.sleep(backoff(breaks - 1))
                        self._start()
                    finally:  # connecting and backing off run on the download's clock
                        self.pace.account(time.monotonic() - began, 0, self.offset, self._left())
                while self.skip:
                    data = self.pace.read1(self.resp, min(self.skip, READ_SIZE), self.offset, self._left())
                    if not data:
                        raise urllib3.exceptions.ProtocolError("connection closed early")
                    self.skip -= len(data)
                data = self.pace.read1(self.resp, n, self.offset, self._left())
                self.offset += len(data)
                if not data and self.size is not None and self.offset < self.size:
                    raise urllib3.exceptions.ProtocolError("connection closed early")
                return data
            except urllib3.exceptions.HTTPError as exc:
                self._drop()
                breaks += 1
                if breaks >= RETRIES:
                    raise RegistryError(f"{self.registry.ref.host}: blob {self.digest}: download broke "
                                        f"at byte {self.offset} {RETRIES} times ({reason(exc)})",
                                        self.digest) from None
                self.resumes += 1

    def _end(self) -> None:
        """At the declared size: an answer of unknown length must end here, not go on."""
        if self.complete or self.resp is None:
            return
        if _length(self.resp) is None:
            try:
                more = self.pace.read1(self.resp, 1, self.offset, 0)
            except urllib3.exceptions.HTTPError:
                self._drop()  # cut after the last byte: all of it is here, the digest will judge
                return
            if more:
                raise self._mismatch(f"more than {self.size} bytes")
        self.complete = True

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (a default chunk when n < 0), fewer only at the end of the blob."""
        n = READ_SIZE if n is None or n < 0 else n
        parts, want = [], n
        while want > 0:
            if self.size is not None:
                want = min(want, self.size - self.offset)  # never read past what the blob may hold
                if want <= 0:
                    if self.declared:
                        self._end()
                    break
            data = self._read1(want)
            if not data:
                self.complete = True
                break
            parts.append(data)
            want -= len(data)
        return b"".join(parts)

    def _drop(self) -> None:
        if self.resp is not None:
            self.resp.close()  # a broken body: never hand this connection back to the pool
            self.resp = None

    def close(self) -> None:
        if self.resp is not None:
            done = self.complete or (self.size is not None and self.offset >= self.size
                                     and _length(self.resp) is not None)
            release(self.resp, done)
            self.resp = None

    def __enter__(self) -> BinaryIO:
        return self  # type: ignore[return-value]

    def __exit__(self, *exc) -> None:
        self.close()

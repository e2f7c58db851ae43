"""S3 specifics the conformance suite cannot show: retries on throttling, clear credential errors."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lazyfs.errors import FormatError, StoreUnavailable
from lazyfs.format import block
from lazyfs.store.s3 import S3Store
from tests.conftest import S3_BUCKET


class _Fake(BaseHTTPRequestHandler):
    """An S3 endpoint that answers as each test needs."""

    def answer(self, status: int, payload: bytes = b"", **headers) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextmanager
def _endpoint(handler, monkeypatch):
    """``handler`` serving on 127.0.0.1, as the S3 endpoint of the stores made meanwhile."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


class _Throttling(_Fake):
    """Answers the first two requests with 503 SlowDown, then with the block."""
    calls = 0
    body = b""

    def do_GET(self):  # noqa: N802
        type(self).calls += 1
        if self.calls <= 2:
            self.answer(503, b"<Error><Code>SlowDown</Code><Message>Reduce your request rate</Message></Error>")
        else:
            self.answer(200, self.body)


def test_throttling_is_retried_with_backoff(monkeypatch):
    digest, frame = block.encode(b"throttled but delivered")
    _Throttling.body = frame
    with _endpoint(_Throttling, monkeypatch):
        assert S3Store("s3://bucket/p").get_block(digest) == frame
    assert _Throttling.calls == 3


def test_wrong_credentials_are_a_clear_error(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = S3Store(f"s3://{S3_BUCKET}/x")
    with pytest.raises(StoreUnavailable, match="access denied"):
        store.check()


def test_bad_urls_are_refused():
    from lazyfs.errors import StoreError
    for bad in ("s3://", "s3:///prefix", "http-not-s3://b/p"):
        with pytest.raises(StoreError):
            S3Store(bad)


class _Conflicting(_Fake):
    """Answers the first PUT 409 ConditionalRequestConflict (another conditional upload of the
    key under way, as AWS says), later ones 200; records each PUT's If-None-Match."""
    puts: list = []

    def do_PUT(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).puts.append(self.headers.get("If-None-Match"))
        if len(self.puts) == 1:
            self.answer(409, b"<Error><Code>ConditionalRequestConflict</Code><Message>A conditional "
                             b"request to this object is in progress</Message></Error>")
        else:
            self.answer(200, ETag='"x"')


def test_a_conflicting_upload_under_way_is_not_taken_for_the_block_being_there(monkeypatch):
    """409 says another conditional upload of the key is in progress, and it may yet fail: the
    block is put again (the same bytes), not reported as already stored, which would let a build
    publish a manifest naming a block that never landed."""
    digest, frame = block.encode(b"raced")
    _Conflicting.puts = []
    with _endpoint(_Conflicting, monkeypatch):
        assert S3Store("s3://bucket/p").put_block(digest, frame) is True
    assert _Conflicting.puts == ["*", None]


class _Huge(_Fake):
    """A block object of 1 GiB, larger than any frame (sent until the reader hangs up)."""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 30))
        self.end_headers()
        try:
            for _ in range(1 << 10):
                self.wfile.write(bytes(1 << 20))
        except OSError:
            pass


def test_an_object_larger_than_any_frame_is_refused_before_its_body_is_read(monkeypatch):
    digest, _ = block.encode(b"whatever")
    with _endpoint(_Huge, monkeypatch):
        started = time.monotonic()
        with pytest.raises(FormatError, match="more than the"):
            S3Store("s3://bucket/p").get_block(digest)
        assert time.monotonic() - started < 5  # (not the 1 GiB read whole)

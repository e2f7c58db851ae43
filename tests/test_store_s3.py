"""S3 specifics the conformance suite cannot show: retries on throttling, clear credential errors."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lazyfs.errors import StoreUnavailable
from lazyfs.format import block
from lazyfs.store.s3 import S3Store
from tests.conftest import S3_BUCKET


class _Throttling(BaseHTTPRequestHandler):
    """Answers the first two requests with 503 SlowDown, then with the block."""
    calls = 0
    body = b""

    def do_GET(self):  # noqa: N802
        type(self).calls += 1
        if self.calls <= 2:
            payload = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate</Message></Error>"
            self.send_response(503)
        else:
            payload = self.body
            self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_throttling_is_retried_with_backoff(monkeypatch):
    digest, frame = block.encode(b"throttled but delivered")
    _Throttling.body = frame
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Throttling)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    try:
        store = S3Store("s3://bucket/p")
        assert store.get_block(digest) == frame
        assert _Throttling.calls == 3
    finally:
        server.shutdown()


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

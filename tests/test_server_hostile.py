"""A hostile but honest client against a real `lazyfs serve` process on 127.0.0.1: no input gets a
500, bodies are bounded before they are read, slow clients cannot starve it, tokens never come
back, and every request reaches the access log."""
from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
import urllib3

from bench.servers import CacheServer
from lazyfs.format import block
from lazyfs.store.local import LocalStore
from tests.conftest import TEST_TOKEN

http = urllib3.PoolManager(retries=False, timeout=10)
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


@pytest.fixture
def server(tmp_path):
    """A real server with a token, a small cache (so big frames are served from memory) and its
    access log on; a cached and an uncacheable block in its origin."""
    origin = LocalStore(tmp_path / "origin")
    small_digest, small = block.encode(b"small block " * 1000)
    big_digest, big = block.encode(bytes(range(256)) * 8192)  # 2 MiB frame, over the cache size
    origin.put_block(small_digest, small)
    origin.put_block(big_digest, big)
    token = tmp_path / "token"
    token.write_text(TEST_TOKEN + "\n")
    srv = CacheServer(str(origin.root), tmp_path / "cache", token_file=token,
                      extra=("--cache-size", "1M", "--header-timeout", "1s",
                             "--max-connections", "24")).start()
    srv.small, srv.big = (small_digest, small), (big_digest, big)
    yield srv
    srv.stop()


def _raw(srv, data: bytes, wait: float = 3.0) -> bytes:
    """Send bytes as they are and read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=wait) as s:
        s.sendall(data)
        return _answer(s)


def _answer(s: socket.socket) -> bytes:
    """What the server sends until it closes or goes quiet."""
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return out


def _status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def _server_memory(srv) -> tuple[int, int]:
    """(current RSS, peak RSS) of the server process, in bytes."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{srv.proc.pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def test_no_client_input_gets_a_500(server):
    small, big = server.small[0], server.big[0]
    http.request("GET", f"{server.url}/v1/blocks/{small}")  # now cached: both paths are covered
    requests = [
        ("POST", "/v1/blocks/batch", b"[" * 50_000, {}),  # nested past the recursion limit
        ("POST", "/v1/blocks/batch", b'{"digests": "sha256:x"}', {}),
        ("PUT", "/v1/leases/a%00b", b"{}", AUTH),  # NUL in a lease name
        ("PUT", "/v1/leases/x", b"{}", {"Authorization": "Bearer \u00e9t\u00e9".encode("utf-8")}),
    ]
    for digest in (small, big):  # the cached path and the from-memory path answer alike
        for rng in ("bytes=abc", "bytes=0-1,5-6", "bytes=9-2", "bytes=-0", "bytes=99999999-"):
            requests.append(("GET", f"/v1/blocks/{digest}", None, {"Range": rng}))
    for method, path, body, headers in requests:
        r = http.request(method, server.url + path, body=body, headers=headers)
        assert 400 <= r.status < 500, (method, path, headers, r.status, r.data[:200])
        assert "error" in json.loads(r.data), r.data[:200]
        if "Range" in headers:
            assert r.status == 416 and r.headers["Content-Range"].startswith("bytes */")
    # A valid range still works on both paths.
    for digest, frame in (server.small, server.big):
        r = http.request("GET", f"{server.url}/v1/blocks/{digest}", headers={"Range": "bytes=-5"})
        assert r.status == 206 and r.data == frame[-5:]
    # What aiohttp answers itself: unparseable request lines and headers, an oversized header.
    for raw in (b"GARBAGE\r\n\r\n", b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n"):
        status, body = _status_and_json(_raw(server, raw))
        assert 400 <= status < 500 and "error" in body


def test_bodies_are_refused_before_they_are_read(server):
    """251 MB batch bodies without a token (declared, and chunked) and a 300 MiB chunked PUT
    with one: each is refused at its route's limit, and the server's memory does not follow."""
    rss_before, _ = _server_memory(server)
    big = 251 * 1024 * 1024
    started = time.monotonic()
    r = http.request("POST", f"{server.url}/v1/blocks/batch", headers={"Content-Length": str(big)},
                     body=b"{", preload_content=True)
    assert r.status == 413 and "error" in json.loads(r.data)
    assert time.monotonic() - started < 2  # refused on the header, not after reading
    for path, headers, total in (("/v1/blocks/batch", {}, big),
                                 (f"/v1/blocks/{server.small[0]}", AUTH, 300 * 1024 * 1024)):
        answer = _chunked(server, path, headers, total)
        status, body = _status_and_json(answer)
        assert status == 413 and "exceeds" in body["error"]
    _, peak = _server_memory(server)
    assert peak - rss_before < 64 * 1024 * 1024, (rss_before, peak)  # the block limit is 16.9 MB
    assert http.request("GET", f"{server.url}/healthz").status == 200


def test_a_compressed_body_is_refused_never_inflated(server):
    """A 255 KB deflate body inflates to 256 MiB: the server neither inflates it (with or without
    a token, on a block PUT or a batch POST) nor lets its memory follow; the answer is 415."""
    import zlib
    bomb = zlib.compress(b"\0" * (256 << 20), 9)
    assert len(bomb) < 300 << 10
    rss_before, _ = _server_memory(server)
    for method, path, headers in (("PUT", f"/v1/blocks/{server.small[0]}", {}),
                                  ("PUT", f"/v1/blocks/{server.small[0]}", AUTH),
                                  ("POST", "/v1/blocks/batch", {})):
        r = http.request(method, f"{server.url}{path}", body=bomb,
                         headers={**headers, "Content-Encoding": "deflate"})
        assert r.status in (401, 413, 415), (method, headers, r.status, r.data[:200])
        assert r.status == 415 or "Authorization" not in headers
    _, peak = _server_memory(server)
    assert peak - rss_before < 64 << 20, (rss_before, peak)
    assert http.request("GET", f"{server.url}/healthz").status == 200


def test_bodies_declared_and_never_sent_hold_no_room(server):
    """Connections that declare large bodies and send nothing reserve nothing: a body that does
    arrive meanwhile is read (not 503, server busy)."""
    from cache_server.requests import BODIES_IN_FLIGHT
    idle = []
    try:
        for _ in range(16):  # 16 block PUTs of 16 MiB declared: all the room bodies may hold
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(f"PUT /v1/blocks/{server.small[0]} HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: {AUTH['Authorization']}\r\n"
                      f"Content-Length: {BODIES_IN_FLIGHT // 16}\r\n\r\n".encode())
            idle.append(s)
        time.sleep(0.5)
        frame = server.small[1]
        r = http.request("PUT", f"{server.url}/v1/blocks/{server.small[0]}", body=frame, headers=AUTH)
        assert r.status in (200, 201, 204), (r.status, r.data[:200])
    finally:
        for s in idle:
            s.close()


def _chunked(srv, path: str, headers: dict, total: int) -> bytes:
    """POST/PUT ``total`` bytes in 1 MiB chunks until the server stops taking them."""
    method = "POST" if path.endswith("batch") else "PUT"
    head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    chunk = b"%x\r\n" % (1 << 20) + b"[" * (1 << 20) + b"\r\n"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(head)
        sent = 0
        try:
            while sent < total:
                s.sendall(chunk)
                sent += 1 << 20
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped taking it (what it read past the limit it dropped)
        return _answer(s)


def test_slow_and_idle_clients_cannot_starve_the_server(server):
    """More half-sent requests than --max-connections: /healthz still answers (the oldest
    waiting connection makes room), and each one is closed after --header-timeout."""
    slow = []
    for _ in range(60):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.sendall(b"GET /heal")
        slow.append(s)
    try:
        started = time.monotonic()
        r = http.request("GET", f"{server.url}/healthz", timeout=5)
        assert r.status == 200 and time.monotonic() - started < 2
        time.sleep(2)  # past the header timeout: every slow one is gone
        for s in slow:
            s.settimeout(2)
            try:
                assert s.recv(100) == b""  # closed by the server
            except ConnectionResetError:
                pass  # closed with our half request unread: a reset, also closed
    finally:
        for s in slow:
            s.close()
    metrics = server.metrics()
    assert metrics["lazyfs_server_connections"] >= 60 - 24  # evicted + timed out, counted


def test_busy_answer_when_every_connection_is_working(tmp_path):
    """When every connection is in the middle of a request, a new one gets a clean 503."""
    origin = LocalStore(tmp_path / "origin")
    digest, frame = block.encode(b"slow block")
    origin.put_block(digest, frame)
    srv = CacheServer(str(origin.root), tmp_path / "cache",
                      extra=("--max-connections", "4", "--delay", "3s")).start()
    busy = []
    try:
        for _ in range(4):  # each waits 3 s for its answer
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(f"GET /v1/blocks/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            busy.append(s)
        time.sleep(0.5)
        status, body = _status_and_json(_raw(srv, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == 503 and "busy" in body["error"]
        for s in busy:
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        for s in busy:
            s.close()
        srv.stop()


def test_tokens_never_come_back(server):
    secret = TEST_TOKEN
    answers = [
        _raw(server, f"PUT /v1/leases/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\x01"
                     f"\r\nContent-Length: 0\r\n\r\n".encode()),
        _raw(server, f"GET /v1/tags/{secret} HTTP/1.1\r\nHost: x\r\n\r\n".encode().replace(
            secret.encode(), b"%00")),
        _raw(server, f"PUT /v1/blocks/{server.small[0]} HTTP/1.1\r\nHost: x\r\nAuthorization: "
                     f"Bearer {secret}x\r\nContent-Length: 3\r\n\r\nabc".encode()),
        _raw(server, f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
                     f"Authorization: Bearer {secret}\r\nConnection: close\r\n\r\n".encode()),
    ]
    for answer in answers:
        assert answer and secret.encode() not in answer
    server.stop()
    assert secret not in server.log.read_text(errors="replace")


def test_the_access_log_sees_every_request(server):
    sent = [b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"GARBAGE\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
            f"GET /v1/blocks/{server.small[0]} HTTP/1.1\r\nHost: x\r\nRange: bytes=9-2\r\n"
            f"Connection: close\r\n\r\n".encode(),
            b"GET /no/such/route HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"]
    for raw in sent:
        assert _raw(server, raw)
    time.sleep(0.3)
    server.stop()
    text = server.log.read_text(errors="replace")
    access = [json.loads(line[line.index("{"):]) for line in text.splitlines()
              if "lazyfs.server.access" in line]
    # The start-up probe's /healthz, then each request sent here, unparseable ones included.
    assert sorted(a["status"] for a in access) == [200, 200, 400, 400, 404, 416]
    assert "Traceback" not in text and "AssertionError" not in text
    assert not re.search(r"ERROR", text), text[-1500:]


def test_clients_that_never_read_their_answers_are_let_go(tmp_path):
    """Each of the server's 4 connections asks for a 16 MiB frame (more than the socket buffers
    hold) and never reads it (its receive window shuts). aiohttp would wait on them for good, and
    /healthz would get 503 (every connection working); the kernel gives up on them after
    --send-timeout, and the server answers again."""
    origin = LocalStore(tmp_path / "origin")
    digest, frame = block.encode(os.urandom(16 << 20))
    origin.put_block(digest, frame)
    srv = CacheServer(str(origin.root), tmp_path / "cache",
                      extra=("--send-timeout", "2s", "--max-connections", "4", "--header-timeout", "30s")).start()
    stuck = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", srv.port))
            s.sendall(f"GET /v1/blocks/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            stuck.append(s)
        time.sleep(0.5)
        busy = http.request("GET", f"{srv.url}/healthz", retries=False)
        assert busy.status == 503  # (every connection is working on an answer nobody reads)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if http.request("GET", f"{srv.url}/healthz", retries=False).status == 200:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the stuck connections were never let go")
        r = http.request("GET", f"{srv.url}/v1/blocks/{digest}")
        assert r.status == 200 and r.data == frame
    finally:
        for s in stuck:
            s.close()
        srv.stop()


def test_a_slow_client_flood_on_a_small_descriptor_limit(tmp_path):
    """256 open files, 320 connections that never finish their headers: /healthz answers, and
    the log does not fill with "Too many open files"."""
    origin = LocalStore(tmp_path / "origin")
    origin.check(write=True)  # (an empty store: a server over none refuses to start)
    srv = CacheServer(str(origin.root), tmp_path / "cache", nofile=256).start()
    flood = []
    try:
        for _ in range(320):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.sendall(b"GET /heal")
            flood.append(s)
        started = time.monotonic()
        r = http.request("GET", f"{srv.url}/healthz", timeout=5)
        assert r.status == 200 and time.monotonic() - started < 2
    finally:
        for s in flood:
            s.close()
        srv.stop()
    assert srv.log.read_text(errors="replace").count("Too many open files") < 5

"""The cache server over real HTTP on 127.0.0.1: auth, verification, single-flight, Range, batch,
eviction, restart. Origins are real LocalStores, wrapped to count (and slow) their GETs."""
from __future__ import annotations

import hashlib
import random
import json
import logging
import socket
import http.client as http_client
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import urllib3

from cache_server.app import ServerConfig
from cache_server.server import ServerThread
from lazyfs.errors import FormatError, StoreUnavailable
from lazyfs.format import block
from lazyfs.store.counting import CountingStore
from lazyfs.store.http import HttpStore
from lazyfs.store.local import LocalStore
from tests.conftest import TEST_TOKEN, lazyfs_cli
from bench.servers import CacheServer

http = urllib3.PoolManager(maxsize=64)


class SlowStore(CountingStore):
    """A real store whose block GETs take a while, so concurrent misses overlap."""

    def __init__(self, inner, delay):
        super().__init__(inner)
        self.delay = delay

    def get_block(self, digest):
        time.sleep(self.delay)
        return super().get_block(digest)


def _unpinned(cache, timeout=10.0) -> bool:
    """Whether the server let go of every pin within ``timeout``: a sendfile answer unpins a
    file once sendfile returns, which can be a moment after the client has read its bytes."""
    deadline = time.monotonic() + timeout
    while cache._pins and time.monotonic() < deadline:
        time.sleep(0.02)
    return not cache._pins


@contextmanager
def _warm(tmp_path, origin, blocks):
    """A server with ``blocks`` cached and verified (one batch brought them), and a client that
    does not retry."""
    for d, f in blocks:
        origin.put_block(d, f)
    with ServerThread(origin, tmp_path / "cache") as srv:
        client = HttpStore(srv.url, retries=0)
        assert list(client.get_blocks([d for d, _ in blocks])) == blocks
        yield srv, client


def _blocks(n, size=200_000, seed=0):
    out = []
    for i in range(n):
        data = hashlib.sha256(f"{seed}-{i}".encode()).digest() * (size // 32)
        out.append(block.encode(data))
    return out


@pytest.fixture
def origin(tmp_path):
    return LocalStore(tmp_path / "origin")


def test_single_flight_50_concurrent_misses(tmp_path, origin):
    digest, frame = block.encode(os.urandom(300_000))
    origin.put_block(digest, frame)
    slow = SlowStore(origin, delay=0.3)
    with ServerThread(slow, tmp_path / "cache") as srv:
        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(lambda _: http.request("GET", f"{srv.url}/v1/blocks/{digest}"),
                                    range(50)))
        assert [a.status for a in answers] == [200] * 50
        assert all(a.data == frame for a in answers)
        assert slow.stats.block_gets == 1
        metrics = srv.server.metrics
        assert metrics.origin_fetches.labels("blocks")._value.get() == 1


def test_range_head_and_batch(tmp_path, origin):
    blocks = _blocks(5)
    for d, f in blocks:
        origin.put_block(d, f)
    counting = CountingStore(origin)
    with ServerThread(counting, tmp_path / "cache") as srv:
        d, f = blocks[0]
        r = http.request("GET", f"{srv.url}/v1/blocks/{d}", headers={"Range": "bytes=10-99"})
        assert r.status == 206 and r.data == f[10:100]
        r = http.request("HEAD", f"{srv.url}/v1/blocks/{blocks[1][0]}")
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(blocks[1][1])
        missing = block.encode(b"not stored")[0]
        client = HttpStore(srv.url)
        wanted = [d for d, _ in blocks] + [missing]
        got = list(client.get_blocks(wanted))
        assert [g[0] for g in got] == wanted
        assert [g[1] for g in got] == [f for _, f in blocks] + [None]
        assert counting.stats.block_gets == 5  # block 0 was cached by the first GET... and reused
        r = http.request("GET", f"{srv.url}/v1/blocks/{missing}")
        assert r.status == 404


def test_auth_and_verification_on_put(tmp_path, origin):
    digest, frame = block.encode(b"payload" * 1000)
    with ServerThread(origin, tmp_path / "cache", config=ServerConfig(token=TEST_TOKEN)) as srv:
        url = f"{srv.url}/v1/blocks/{digest}"
        assert http.request("PUT", url, body=frame).status == 401
        assert http.request("PUT", url, body=frame, headers={"Authorization": "Bearer wrong"}).status == 403
        assert not origin.has_block(digest)
        good = {"Authorization": f"Bearer {TEST_TOKEN}"}
        other_digest, _ = block.encode(b"something else")
        r = http.request("PUT", f"{srv.url}/v1/blocks/{other_digest}", body=frame, headers=good)
        assert r.status == 400 and b"hashes to" in r.data
        assert not origin.has_block(other_digest)
        r = http.request("PUT", f"{srv.url}/v1/blocks/{digest}", body=b"not zstd at all", headers=good)
        assert r.status == 400 and not origin.has_block(digest)
        for bad in ("..%2F..%2Fetc%2Fpasswd", "sha256:" + "G" * 64, "sha256:abc", "..%2Fx"):
            assert http.request("GET", f"{srv.url}/v1/blocks/{bad}").status == 400, bad
            assert http.request("PUT", f"{srv.url}/v1/blocks/{bad}", body=frame, headers=good).status == 400
        for raw in ("/v1/blocks/../x", "/v1/blocks/../../etc/passwd", "/v1/manifests/./x"):
            conn = http_client.HTTPConnection("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))
            conn.request("PUT", raw, body=frame, headers=good)
            assert conn.getresponse().status == 400, raw
            conn.close()
        assert http.request("PUT", url, body=frame, headers=good).status == 201
        assert http.request("PUT", url, body=frame, headers=good).status == 200  # already there
        assert origin.get_block(digest) == frame
        r = http.request("PUT", f"{srv.url}/v1/tags/app:v1", body=b"nonsense", headers=good)
        assert r.status == 400
        assert http.request("PUT", f"{srv.url}/v1/tags/app:v1", body=digest.encode()).status == 401
        assert origin.list_tags() == []
        assert list(origin.list_manifests()) == []


def test_reads_can_require_the_token(tmp_path, origin):
    digest, frame = block.encode(b"secret image bytes")
    origin.put_block(digest, frame)
    with ServerThread(origin, tmp_path / "cache",
                      config=ServerConfig(token=TEST_TOKEN, auth_reads=True)) as srv:
        assert http.request("GET", f"{srv.url}/v1/blocks/{digest}").status == 401
        assert HttpStore(srv.url, token=TEST_TOKEN).get_block(digest) == frame
        assert http.request("GET", f"{srv.url}/healthz").status == 200


def test_origin_with_wrong_bytes_is_not_served_or_cached(tmp_path, origin):
    digest, _ = block.encode(b"what the name says")
    _, wrong = block.encode(b"what the origin holds")
    (origin.root / "blocks" / "sha256" / digest[7:9]).mkdir(parents=True)
    origin.put_block(digest, b"")  # create layout
    origin._block_path(digest).write_bytes(wrong)
    with ServerThread(origin, tmp_path / "cache") as srv:
        r = http.request("GET", f"{srv.url}/v1/blocks/{digest}")
        assert r.status == 502 and b"hashes to" in r.data
        assert len(srv.server.cache) == 0


def test_eviction_keeps_reads_correct_and_under_the_cap(tmp_path, origin):
    blocks = _blocks(30, size=100_000)
    for d, f in blocks:
        origin.put_block(d, f)
    cap = 5 * len(blocks[0][1]) + 100
    with ServerThread(origin, tmp_path / "cache", cache_size=cap) as srv:
        client = HttpStore(srv.url)
        for _ in range(2):
            for d, f in blocks:
                assert client.get_block(d) == f
                assert srv.server.cache.bytes <= cap
        on_disk = sum(p.stat().st_size for p in (tmp_path / "cache" / "blocks").rglob("*") if p.is_file())
        assert on_disk <= cap
        assert srv.server.cache.stats.evictions >= 25


def test_restart_serves_cached_blocks_and_never_a_torn_file(tmp_path, origin):
    blocks = _blocks(4)
    for d, f in blocks:
        origin.put_block(d, f)
    cache_dir = tmp_path / "cache"
    server = CacheServer(str(origin.root), cache_dir, extra=("--no-access-log",)).start()
    try:
        client = HttpStore(server.url)
        for d, f in blocks:
            assert client.get_block(d) == f
        assert server.metrics()["lazyfs_server_origin_fetches_total"] == 4
        assert Path(f"/proc/{server.proc.pid}/comm").read_text() == "lazyfs-serve\n"  # (top, ps)
    finally:
        server.kill()  # SIGKILL: no clean shutdown
    # A crash mid-write: a torn file under a final name, and a temp file.
    torn = cache_dir / "blocks" / blocks[3][0][7:9] / blocks[3][0][7:]
    torn.write_bytes(blocks[3][1][: len(blocks[3][1]) // 2])
    (cache_dir / "tmp" / ".part-crashed").write_bytes(b"half a block")
    # Not this cache's: a stray file where prefix directories are, a block under another prefix.
    (cache_dir / "blocks" / "README").write_text("notes\n")
    (cache_dir / "blocks" / "zz").mkdir()
    (cache_dir / "blocks" / "zz" / blocks[0][0][7:]).write_bytes(blocks[0][1])
    server = CacheServer(str(origin.root), cache_dir, port=server.port, extra=("--no-access-log",)).start()
    try:
        # A cache-only probe: a file from before the restart is verified here and served; the
        # torn one is dropped and answered 504, never filled from the origin for a probe.
        only = {"Cache-Control": "only-if-cached"}
        answer = http.request("GET", f"{server.url}/v1/blocks/{blocks[0][0]}", headers=only)
        assert answer.status == 200 and answer.data == blocks[0][1]
        assert http.request("GET", f"{server.url}/v1/blocks/{blocks[3][0]}", headers=only).status == 504
        assert server.metrics()["lazyfs_server_origin_fetches_total"] == 0
        assert json.loads(http.request("GET", f"{server.url}/healthz").data)["cache_entries"] == 3  # (the torn one dropped)
        client = HttpStore(server.url)
        for d, f in blocks[:3]:
            assert client.get_block(d) == f
        assert server.metrics()["lazyfs_server_origin_fetches_total"] == 0
        assert client.get_block(blocks[3][0]) == blocks[3][1]  # dropped, refetched, never sent torn
        m = server.metrics()
        assert m["lazyfs_server_origin_fetches_total"] == 1
        assert m["lazyfs_server_verify_failures_total"] == 1
        assert not (cache_dir / "tmp" / ".part-crashed").exists()
    finally:
        server.stop()


def test_two_servers_cannot_share_a_cache_dir(tmp_path, origin):
    with ServerThread(origin, tmp_path / "cache"):
        with pytest.raises(Exception, match="in use by another"):
            ServerThread(origin, tmp_path / "cache").start()


def test_metrics_and_healthz(tmp_path, origin):
    digest, frame = block.encode(random.Random(5).randbytes(5000))
    origin.put_block(digest, frame)
    with ServerThread(origin, tmp_path / "cache") as srv:
        for _ in range(3):
            http.request("GET", f"{srv.url}/v1/blocks/{digest}")
        text = http.request("GET", f"{srv.url}/metrics").data.decode()
        assert "lazyfs_server_cache_hit_ratio 0.666" in text
        assert 'lazyfs_server_requests_total{code="200",method="GET",route="/v1/blocks/{digest}"} 3.0' in text
        assert "lazyfs_server_request_seconds_bucket" in text
        assert f"lazyfs_server_cache_bytes {float(len(frame))}" in text
        # Body bytes count cached answers too, though sendfile(2) sends those: 3 full bodies
        # and one 100-byte range; a HEAD sends none.
        http.request("GET", f"{srv.url}/v1/blocks/{digest}", headers={"Range": "bytes=0-99"})
        http.request("HEAD", f"{srv.url}/v1/blocks/{digest}")
        text = http.request("GET", f"{srv.url}/metrics").data.decode()
        assert (f'lazyfs_server_response_bytes_total{{route="/v1/blocks/{{digest}}"}} '
                f'{float(3 * len(frame) + 100)}') in text
        assert http.request("GET", f"{srv.url}/healthz").status == 200


def test_client_disconnect_does_not_cancel_a_shared_fetch(tmp_path, origin):
    digest, frame = block.encode(os.urandom(100_000))
    origin.put_block(digest, frame)
    slow = SlowStore(origin, delay=0.5)
    with ServerThread(slow, tmp_path / "cache") as srv:
        impatient = threading.Thread(target=lambda: _ignore(lambda: http.request(
            "GET", f"{srv.url}/v1/blocks/{digest}", timeout=0.1, retries=False)))
        impatient.start()
        time.sleep(0.05)
        assert http.request("GET", f"{srv.url}/v1/blocks/{digest}").data == frame
        impatient.join()
        assert slow.stats.block_gets == 1


def _ignore(fn):
    try:
        fn()
    except Exception:
        pass


def test_cli_build_through_a_server_needs_the_token(tmp_path, origin, env_dirs):
    from tests.conftest import busybox_rootfs, lazyfs_cli
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    token_file = tmp_path / "token"
    token_file.write_text(TEST_TOKEN + "\n")
    server = CacheServer(str(origin.root), tmp_path / "cache", token_file=token_file).start()
    try:
        denied = lazyfs_cli("build", f"dir:{rootfs}", "--tag", "via/server:1", "--store", server.url,
                            check=False)
        assert denied.returncode != 0
        assert "401" in denied.stderr and "LAZYFS_TOKEN" in denied.stderr
        assert origin.list_tags() == [] and list(origin.list_blocks()) == []
        lazyfs_cli("build", f"dir:{rootfs}", "--tag", "via/server:1", "--store", server.url,
                   env={"LAZYFS_TOKEN_FILE": str(token_file)})
        assert [t[:2] for t in origin.list_tags()] == [("via/server", "1")]
        listed = lazyfs_cli("images", "--store", server.url).stdout
        assert "via/server" in listed
        assert server.metrics()["lazyfs_server_verify_failures_total"] == 0
    finally:
        server.stop()
    access = [json.loads(line.split("lazyfs.server.access: ", 1)[1])
              for line in server.log.read_text().splitlines() if "lazyfs.server.access: " in line]
    assert any(a["status"] == 401 and a["method"] == "GET" for a in access)  # the refused check
    assert any(a["status"] == 201 and a["method"] == "PUT" and a["bytes"] > 0 for a in access)


def test_cli_errors_are_one_line(tmp_path, s3_server):
    from tests.conftest import lazyfs_cli
    missing = lazyfs_cli("images", "--store", "s3://no-such-bucket-here/x", check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    bad = lazyfs_cli("serve", "--store", str(tmp_path / "s"), "--cache-dir", tmp_path / "c",
                     "--listen", "nonsense", check=False)
    assert bad.returncode != 0 and "HOST:PORT" in bad.stderr
    short = tmp_path / "short-token"
    short.write_text("abc\n")
    bad = lazyfs_cli("serve", "--store", str(tmp_path / "s"), "--cache-dir", tmp_path / "c",
                     "--token-file", short, check=False)
    assert bad.returncode != 0 and "at least 16" in bad.stderr
    down = lazyfs_cli("images", "--store", "http://127.0.0.1:9", check=False)
    assert down.returncode != 0 and "refused" in down.stderr.lower()


def test_a_batch_larger_than_the_cache_sends_every_block_it_fetched(tmp_path, origin):
    """Blocks of one batch answer are pinned until sent: inserting the later ones into a cache
    too small for all of them must not evict the earlier ones before they go out."""
    blocks = _blocks(8, size=100_000, seed=3)
    for d, f in blocks:
        origin.put_block(d, f)
    frame_size = len(blocks[0][1])
    with ServerThread(origin, tmp_path / "cache", cache_size=int(frame_size * 2.5)) as srv:
        got = list(HttpStore(srv.url).get_blocks([d for d, _ in blocks]))
        assert got == blocks
        cache = srv.server.cache
        assert cache.bytes <= frame_size * 2.5  # pins released: the cap holds again
        assert not cache._pins


def test_batch_bodies_are_checked_without_asserts(tmp_path, origin):
    """Request checks are code, not `assert` (which `python -O` removes): a real server run
    with PYTHONOPTIMIZE=1 still refuses malformed batch bodies."""
    digest, frame = block.encode(b"one block")
    origin.put_block(digest, frame)
    srv = CacheServer(str(origin.root), tmp_path / "cache", env={"PYTHONOPTIMIZE": "1"}).start()
    try:
        for body in ({"digests": {digest: 1}}, {"digests": [digest, 7]}, [digest], {"digests": digest},
                     "[" * 50_000):
            raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            r = http.request("POST", f"{srv.url}/v1/blocks/batch", body=raw,
                             headers={"Content-Type": "application/json"})
            assert r.status == 400, (body if not isinstance(body, str) else "deep", r.status)
            assert "digests" in json.loads(r.data)["error"]
        ok = http.request("POST", f"{srv.url}/v1/blocks/batch", body=json.dumps({"digests": [digest]}))
        assert ok.status == 200 and ok.data.endswith(frame)
    finally:
        srv.stop()


def test_a_connection_is_reusable_after_a_head(tmp_path, origin):
    """HEAD answers hand their connection back in a state the next request can use. Without retries
    (which would hide it), a PUT after HEADs on the same keep-alive connection must succeed, and
    report the block as new exactly once."""
    with ServerThread(origin, tmp_path / "cache", config=ServerConfig(token=TEST_TOKEN)) as srv:
        client = HttpStore(srv.url, token=TEST_TOKEN, retries=0, connections=1)
        try:
            for i in range(200):
                digest, frame = block.encode(i.to_bytes(4, "big") * 50)
                assert client.block_size(digest) is None
                assert not client.has_block(digest)
                assert client.put_block(digest, frame) is True
                assert client.block_size(digest) == len(frame)
                assert client.put_block(digest, frame) is False
        finally:
            client.http.clear()


def test_a_batch_of_cached_blocks_goes_out_by_sendfile_with_its_length(tmp_path, origin):
    """Every block cached and verified: the answer has a Content-Length (sendfile from the cache
    files, not chunked). One block not cached yet: streamed (chunked) as fills come in. The
    records are the same either way, 404s included."""
    blocks = _blocks(6, seed=7)
    for d, f in blocks:
        origin.put_block(d, f)
    missing = block.encode(b"never stored")[0]
    with ServerThread(origin, tmp_path / "cache") as srv:
        def post(wanted):
            r = http.request("POST", f"{srv.url}/v1/blocks/batch", body=json.dumps({"digests": wanted}),
                             headers={"Content-Type": "application/json"})
            assert r.status == 200
            return r
        first = post([d for d, _ in blocks[:4]])  # fills 4 of them
        assert first.headers.get("Transfer-Encoding") == "chunked"
        mixed = [d for d, _ in blocks[:5]]  # block 4 is not cached yet
        assert post(mixed).headers.get("Transfer-Encoding") == "chunked"
        warm = post(mixed)  # all five cached now
        assert "Transfer-Encoding" not in warm.headers
        assert int(warm.headers["Content-Length"]) == len(warm.data)
        expected = b"".join(f"{d} 200 {len(f)}\n".encode() + f for d, f in blocks[:5])
        assert warm.data == expected
        got = list(HttpStore(srv.url).get_blocks(mixed + [missing]))  # a 404 among them: streamed
        assert got == blocks[:5] + [(missing, None)]
        assert dict(HttpStore(srv.url).get_blocks(mixed)) == dict(blocks[:5])
        assert _unpinned(srv.server.cache)


def _damage(path: str, damage: str, frame: bytes) -> None:
    if damage == "removed":
        os.unlink(path)
    else:
        os.truncate(path, len(frame) // 2)


@pytest.mark.parametrize("damage", ["removed", "truncated"])
@pytest.mark.parametrize("how", ["GET", "batch of cached blocks", "batch with a block to fill"])
def test_a_cache_file_damaged_since_it_was_verified_is_filled_again_not_served(tmp_path, origin, damage, how):
    """A verified entry's file removed or cut short (a disk cleaned by hand, a full disk): the
    answer comes whole, from the origin again, not as a short frame or a 404 for a block the
    origin has; the entry is dropped and filled again."""
    blocks = _blocks(3, seed=11)
    extra = _blocks(1, seed=12)[0]
    origin.put_block(*extra)  # (not cached: a batch asking for it is streamed as fills come in)
    with _warm(tmp_path, origin, blocks) as (srv, client):
        _damage(srv.server.cache.path("blocks", blocks[1][0]), damage, blocks[1][1])
        if how == "GET":
            answer = http.request("GET", f"{srv.url}/v1/blocks/{blocks[1][0]}")
            assert answer.status == 200 and answer.data == blocks[1][1]
        else:
            wanted = blocks + ([extra] if how == "batch with a block to fill" else [])
            assert list(client.get_blocks([d for d, _ in wanted])) == wanted
        cache = srv.server.cache
        assert _unpinned(cache) and cache.stats.dropped_corrupt == 1
        assert os.path.getsize(cache.path("blocks", blocks[1][0])) == len(blocks[1][1])  # filled again


@pytest.mark.parametrize("damage", ["removed", "truncated"])
def test_a_cache_file_lost_mid_answer_cuts_the_answer_short(tmp_path, origin, damage, monkeypatch):
    """A sendfile answer has announced its length: a cache file that cannot be read any more
    closes the connection, so the client sees a truncated answer (never a record with other
    bytes). The entry is dropped: the next answer fills it from the origin again."""
    blocks = _blocks(3, seed=9)
    wanted = [d for d, _ in blocks]
    with _warm(tmp_path, origin, blocks) as (srv, client):
        # Damaged once the answer has looked at it (its length announced), before it is sent.
        monkeypatch.setattr(srv.server.filler, "_intact", lambda *args: True)
        path = srv.server.cache.path("blocks", blocks[1][0])
        if damage == "removed":
            os.unlink(path)
        else:
            os.truncate(path, len(blocks[1][1]) // 2)
        got = []
        with pytest.raises(StoreUnavailable, match="IncompleteRead|truncated"):
            for item in client.get_blocks(wanted):
                got.append(item)
        assert len(got) <= 1 and got == blocks[:len(got)]  # what came before the cut is right
        cache = srv.server.cache
        assert _unpinned(cache) and cache.size("blocks", blocks[1][0]) is None
        assert cache.stats.dropped_corrupt == 1
        assert list(client.get_blocks(wanted)) == blocks


def test_a_client_gone_mid_answer_leaves_the_cache_as_it_was(tmp_path, origin, caplog):
    """A node that closes its connection partway through a sendfile answer: the server stops,
    unpins, and blames no cache file (nothing dropped as damaged, no error logged)."""
    blocks = [block.encode(os.urandom(400_000)) for _ in range(48)]  # 19 MB: more than the sockets hold
    wanted = [d for d, _ in blocks]
    with _warm(tmp_path, origin, blocks) as (srv, client):
        conn = http_client.HTTPConnection("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))
        conn.connect()
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # a slow reader
        conn.request("POST", "/v1/blocks/batch", body=json.dumps({"digests": wanted}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and "Content-Length" in resp.headers
        resp.read(1000)
        time.sleep(0.2)  # the server is in the middle of a file, blocked on the socket
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        cache = srv.server.cache
        assert _unpinned(cache)
        assert cache.stats.dropped_corrupt == 0
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
        assert all(cache.size("blocks", d) is not None for d in wanted)
        assert list(client.get_blocks(wanted)) == blocks


class _Shaped(BaseHTTPRequestHandler):
    """A batch answer bent as ``mode`` says, most with a Content-Length (which the client reads
    straight from the socket), one chunked: the client must refuse every one with a typed error."""
    mode = "short"
    frames: dict = {}

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802 - http.server's naming
        wanted = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["digests"]
        order = wanted[::-1] if self.mode == "order" else wanted
        body = b"".join(f"{d} 200 {len(self.frames[d])}\n".encode() + self.frames[d] for d in order)
        declared = len(body)
        if self.mode == "extra":
            body += b"x"
            declared += 1
        elif self.mode == "short-header":  # cut inside the last header's digest
            body = body[:body.rindex(b"\n", 0, len(body) - len(self.frames[order[-1]])) - 30]
        elif self.mode == "chunked-short":  # a chunked body that ends cleanly, a record short
            last = body.rindex(order[-1].encode())
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (last, body[:last]))
            return
        elif self.mode == "short":
            body = body[:-100]
        self.send_response(200)
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        self.wfile.write(body)
        if self.mode.startswith("short"):
            self.close_connection = True


@pytest.mark.parametrize("mode,error", [("short", StoreUnavailable), ("short-header", StoreUnavailable),
                                        ("chunked-short", StoreUnavailable), ("extra", FormatError),
                                        ("order", FormatError)])
def test_a_bent_batch_answer_is_refused(mode, error):
    blocks = [block.encode(os.urandom(300_000)) for _ in range(3)]
    handler = type("H", (_Shaped,), {"mode": mode, "frames": dict(blocks)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = HttpStore(f"http://127.0.0.1:{server.server_address[1]}", retries=0)
        got = []
        with pytest.raises(error):
            for item in client.get_blocks([d for d, _ in blocks]):
                got.append(item)
        assert got == blocks[:len(got)]  # whatever came before the fault was right
        client.close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_short_of_descriptors_cuts_the_answer_but_blames_no_file(tmp_path, origin, monkeypatch):
    """A cache file the server cannot open for a reason that is not the file's (EMFILE): the
    answer is cut short, the client gets a typed error, and the entry stays, still served."""
    import errno
    from cache_server import batches
    blocks = _blocks(3, seed=17)
    wanted = [d for d, _ in blocks]
    with _warm(tmp_path, origin, blocks) as (srv, client):
        calls = []

        def out_of_descriptors(path, mode="r", *a, **k):
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.EMFILE, "Too many open files")
            return open(path, mode, *a, **k)
        monkeypatch.setattr(batches, "open", out_of_descriptors, raising=False)
        with pytest.raises(StoreUnavailable):
            list(client.get_blocks(wanted))
        cache = srv.server.cache
        assert _unpinned(cache) and cache.stats.dropped_corrupt == 0
        assert all(cache.verified("blocks", d) for d in wanted)
        assert list(client.get_blocks(wanted)) == blocks


@pytest.mark.parametrize("how", ["loop without sendfile", "AIOHTTP_NOSENDFILE"])
def test_cached_batches_without_sendfile_are_exact(tmp_path, origin, monkeypatch, how):
    """An event loop without sendfile: each cached frame is read and written instead, the
    answer keeps its length. aiohttp's AIOHTTP_NOSENDFILE: every batch streams (chunked)."""
    import asyncio
    from cache_server import batches
    blocks = [block.encode(os.urandom(100_000)) for _ in range(4)]
    wanted = [d for d, _ in blocks]
    with _warm(tmp_path, origin, blocks) as (srv, client):
        if how == "AIOHTTP_NOSENDFILE":
            monkeypatch.setattr(batches, "NOSENDFILE", True)
        else:
            async def no_sendfile(self, *args, **kwargs):
                raise NotImplementedError
            monkeypatch.setattr(asyncio.BaseEventLoop, "sendfile", no_sendfile)
        r = http.request("POST", f"{srv.url}/v1/blocks/batch", body=json.dumps({"digests": wanted}),
                         headers={"Content-Type": "application/json"})
        assert r.status == 200
        assert r.data == b"".join(f"{d} 200 {len(f)}\n".encode() + f for d, f in blocks)
        chunked = r.headers.get("Transfer-Encoding") == "chunked"
        assert chunked == (how == "AIOHTTP_NOSENDFILE")
        assert list(HttpStore(srv.url).get_blocks(wanted)) == blocks
        assert _unpinned(srv.server.cache)


def test_a_server_over_no_store_refuses_to_start(tmp_path):
    """A mistyped origin would answer 404 for everything, which nodes take for the truth; with
    no write token nothing could ever make it, so the server does not start."""
    r = lazyfs_cli("serve", "--store", tmp_path / "typo", "--cache-dir", tmp_path / "cache", "--listen",
                   "127.0.0.1:1", check=False, timeout=30)
    assert r.returncode == 1 and f"no lazyfs store at {tmp_path / 'typo'}" in r.stderr, r.stderr
    assert not (tmp_path / "typo").exists()


def test_a_block_the_origin_lost_is_not_there_for_a_build(tmp_path, origin):
    """gc beside the server (on the origin directly, or through another server) deletes a block
    this server still has cached. Readers may still get it from the cache; a build asking
    whether to upload it gets the origin's word, uploads it again, and its manifest names a block
    the origin has."""
    blocks = _blocks(2)
    with _warm(tmp_path, origin, blocks) as (srv, client):
        d, f = blocks[0]
        origin.delete_block(d)
        assert client.block_size(d) == len(f)  # a reader: the server's cache answers
        assert client.get_block(d) == f
        assert client.has_block(d) is False  # a build: the origin's answer
        assert client.has_block(blocks[1][0]) is True


def test_a_fetched_frame_is_checked_at_once_not_after_every_fill_queued_behind_it(tmp_path, origin, monkeypatch):
    """Many batches of misses at once: each frame the origin sends is verified (and cached) by
    the same pool job that fetched it, so at most one frame a pool thread waits unchecked in
    memory, not one for every fill queued meanwhile."""
    from cache_server import filler as filler_mod
    blocks = _blocks(400, size=8_000, seed=21)
    for d, f in blocks:
        origin.put_block(d, f)
    unchecked, peak, lock = [0], [0], threading.Lock()

    class Counting(SlowStore):
        def get_block(self, digest):
            frame = super().get_block(digest)
            with lock:
                unchecked[0] += 1
                peak[0] = max(peak[0], unchecked[0])
            return frame

    check = filler_mod.verify

    def verify(kind, digest, frame):
        with lock:
            unchecked[0] -= 1
        return check(kind, digest, frame)

    monkeypatch.setattr(filler_mod, "verify", verify)
    groups = [blocks[i:i + 20] for i in range(0, len(blocks), 20)]
    with ServerThread(Counting(origin, delay=0.01), tmp_path / "cache") as srv:
        with ThreadPoolExecutor(len(groups)) as pool:
            got = list(pool.map(lambda g: list(HttpStore(srv.url, retries=0).get_blocks([d for d, _ in g])),
                                groups))
    assert got == groups
    assert peak[0] <= 32, f"{peak[0]} frames fetched and not yet checked at once"


def test_an_objects_etag_is_its_digest_whether_cached_or_not(tmp_path, origin):
    digest, frame = block.encode(os.urandom(300_000))
    origin.put_block(digest, frame)
    asking = {"If-Match": f'"{digest}"', "If-None-Match": "*", "If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}
    with ServerThread(origin, tmp_path / "cache") as srv:
        answers = [http.request("GET", f"{srv.url}/v1/blocks/{digest}") for _ in range(2)]  # filled, then cached
        # Conditions answered alike cached or not (the object is what its digest says, always).
        answers.append(http.request("GET", f"{srv.url}/v1/blocks/{digest}", headers=asking))
        assert _unpinned(srv.server.cache)
    assert [(a.status, a.headers.get("ETag"), a.data == frame) for a in answers] == [(200, f'"{digest}"', True)] * 3

"""The fleet client against real cache servers on 127.0.0.1: sharding, failover, hedging,
lying servers, deadlines (no FUSE here; test_fleet_mount.py does it through a mount)."""
from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cache_server.app import ServerConfig
from cache_server.server import ServerThread
from lazyfs.errors import BlockNotFound, DigestMismatch, FormatError, StoreUnavailable
from lazyfs.format import batch as batchfmt, block
from lazyfs.source import rendezvous
from lazyfs.source.fleet import Fleet, FleetOptions
from lazyfs.store.counting import CountingStore
from lazyfs.store.http import HttpStore
from lazyfs.store.local import LocalStore


def _blocks(n, size=50_000):
    return [block.encode(hashlib.sha256(str(i).encode()).digest() * (size // 32)) for i in range(n)]


@pytest.fixture
def origin(tmp_path):
    store = LocalStore(tmp_path / "origin")
    blocks = _blocks(40)
    for d, f in blocks:
        store.put_block(d, f)
    return store, blocks


def test_rendezvous_is_stable_and_moves_only_the_removed_servers_keys():
    servers = [f"http://10.0.0.{i}:7070" for i in range(5)]
    keys = [f"sha256:{i:064x}" for i in range(2000)]
    before = {k: rendezvous.rank(servers, k)[0] for k in keys}
    counts = {s: sum(1 for v in before.values() if v == s) for s in servers}
    assert all(300 < c < 500 for c in counts.values()), counts  # roughly even
    after = {k: rendezvous.rank(servers[1:], k)[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == servers[0] for k in moved)
    assert len(moved) == counts[servers[0]]


def test_each_block_is_fetched_from_its_owner_only(tmp_path, origin):
    store, blocks = origin
    counting = CountingStore(store)
    with ServerThread(counting, tmp_path / "c1") as a, ServerThread(counting, tmp_path / "c2") as b:
        fleet = Fleet([a.url, b.url], options=FleetOptions(hedge_after=30))  # no hedges on a busy CI
        for d, f in blocks:
            assert fleet.get_block(d) == f
            assert fleet.fetch_block(d, len(block.decode(d, f))) == block.decode(d, f)
        assert counting.stats.block_gets == len(blocks)  # one origin GET per block, fleet-wide
        owners = {d: rendezvous.rank([a.url, b.url], f"block {d}")[0] for d, _ in blocks}
        for srv in (a, b):
            fetched = srv.server.metrics.origin_fetches.labels("blocks")._value.get()
            assert fetched == sum(1 for o in owners.values() if o == srv.url)
        assert fleet.stats.failovers == 0 and fleet.stats.hedges == 0
        fleet.close()


def test_dead_server_fails_over_then_origin(tmp_path, origin):
    store, blocks = origin
    a = ServerThread(store, tmp_path / "c1").start()
    b = ServerThread(store, tmp_path / "c2").start()
    fleet = Fleet([a.url, b.url], options=FleetOptions(deadline=5))
    a.stop()
    for d, f in blocks:
        assert fleet.get_block(d) == f
    assert fleet.stats.failovers == 1  # one refused connection, then a is tried last for a while
    b.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="every source failed"):
        fleet.get_block(blocks[0][0])  # an outage is retried with backoff until the deadline
    assert 4.5 < time.monotonic() - started < 8 and fleet.stats.retries >= 3
    with_origin = Fleet([a.url, b.url], origin=store)
    assert with_origin.get_block(blocks[0][0]) == blocks[0][1]
    assert with_origin.stats.origin_reads == 1
    with pytest.raises(BlockNotFound):
        with_origin.get_block(block.encode(b"nowhere")[0])
    fleet.close()
    with_origin.close()


def test_slow_server_is_hedged(tmp_path, origin):
    store, blocks = origin
    with ServerThread(store, tmp_path / "slow", config=ServerConfig(delay=3.0)) as slow, \
            ServerThread(store, tmp_path / "fast") as fast:
        fleet = Fleet([slow.url, fast.url], options=FleetOptions(hedge_after=0.1, deadline=10))
        owned_by_slow = [(d, f) for d, f in blocks
                         if rendezvous.rank([slow.url, fast.url], f"block {d}")[0] == slow.url]
        d, f = owned_by_slow[0]
        started = time.monotonic()
        assert fleet.get_block(d) == f
        # A cache-only probe of the fast server at 0.1 s misses; at 4 x 0.1 s a full hedge
        # lets it fill from the origin and answer.
        assert time.monotonic() - started < 1.5
        assert fleet.stats.hedges == 2 and fleet.stats.probe_misses == 1
        assert fast.server.metrics.origin_fetches.labels("blocks")._value.get() == 1
        # Now the fast server has it cached, and the slow one, outrun, is asked last for a while:
        # the next of its blocks comes from the fast one at once, with no hedge.
        d2, f2 = owned_by_slow[1]
        fast_client = HttpStore(fast.url)
        assert fast_client.get_block(d2) == f2  # warm the fast server's cache
        fetched_before = fast.server.metrics.origin_fetches.labels("blocks")._value.get()
        started = time.monotonic()
        assert fleet.get_block(d2) == f2
        assert time.monotonic() - started < 0.35
        assert fleet.stats.hedges == 2 and fleet.stats.probe_misses == 1
        assert fast.server.metrics.origin_fetches.labels("blocks")._value.get() == fetched_before
        fleet.close()


def test_slow_answers_everywhere_do_not_multiply_origin_fetches(tmp_path, origin):
    """A burst makes every answer slow; hedges then probe caches instead of filling twice."""
    store, blocks = origin
    counting = CountingStore(store)
    config = ServerConfig(delay=0.3)
    with ServerThread(counting, tmp_path / "a", config=config) as a, \
            ServerThread(counting, tmp_path / "b", config=config) as b:
        # Probes go out at 0.15 s, a full hedge would at 0.6 s: an answer due at 0.3 s plus a
        # loaded machine's jitter stays well inside the window where only probes are allowed.
        fleet = Fleet([a.url, b.url], options=FleetOptions(hedge_after=0.15, deadline=10))
        for d, f in blocks[:6]:
            assert fleet.get_block(d) == f
        assert counting.stats.block_gets == 6  # one origin fetch per block despite the hedges
        assert fleet.stats.hedges >= 6  # every request was hedged (with a cache-only probe)
        fleet.close()


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Liar(_Quiet):
    """Answers every block GET with a well-formed frame of the wrong content."""
    frame = block.encode(b"not what you asked for")[1]

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.frame)))
        self.end_headers()
        self.wfile.write(self.frame)

    def do_POST(self):  # noqa: N802 - a batch answer with the wrong frame for every block
        wanted = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["digests"]
        body = b"".join(batchfmt.encode_header(d, 200, len(self.frame)) + self.frame for d in wanted)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_wrong_bytes_are_detected_and_fetched_elsewhere(tmp_path, origin):
    store, blocks = origin
    liar = ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    liar_url = f"http://127.0.0.1:{liar.server_address[1]}"
    try:
        with ServerThread(store, tmp_path / "honest") as honest:
            fleet = Fleet([liar_url, honest.url])
            for d, f in blocks:
                assert fleet.get_block(d) == f
            assert fleet.stats.wrong_bytes >= 1
            fleet.close()
    finally:
        liar.shutdown()


def test_wrong_bytes_in_a_batch_are_counted_and_fetched_elsewhere(origin):
    """A batch answer's wrong frames count as a single read's would, and go elsewhere."""
    store, blocks = origin
    liar = ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    fleet = Fleet([f"http://127.0.0.1:{liar.server_address[1]}"], origin=store)
    try:
        wanted = [(d, len(block.decode(d, f))) for d, f in blocks[:5]]
        got = dict(fleet.fetch_blocks(wanted))
        assert got == {d: block.decode(d, f) for d, f in blocks[:5]}  # from the origin
        assert fleet.stats.wrong_bytes >= 5 and fleet.stats.origin_reads == 5
    finally:
        fleet.close()
        liar.shutdown()


class _Garbler(_Liar):
    """Answers with a frame that does not even decode (a damaged copy): wrong bytes too."""
    frame = block.encode(b"x" * 4096)[1][:-8] + b"\xff" * 8


@pytest.mark.parametrize("server, error", [(_Liar, DigestMismatch), (_Garbler, FormatError)])
def test_wrong_bytes_from_every_source_fail_at_once_not_at_the_deadline(origin, server, error):
    """Only a liar to ask: another round would get the same bytes, so the read fails with the
    typed error (carrying the digest) at once instead of retrying until the deadline; with the
    origin behind it, the read still succeeds from there."""
    store, blocks = origin
    liar = ThreadingHTTPServer(("127.0.0.1", 0), server)
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{liar.server_address[1]}"
    fleet = Fleet([url], options=FleetOptions(deadline=20.0))
    try:
        started = time.monotonic()
        with pytest.raises(error) as exc:
            fleet.get_block(blocks[0][0])
        assert error is FormatError or exc.value.digest == blocks[0][0]
        assert time.monotonic() - started < 5.0 and fleet.stats.deadline_failures == 0
        backed = Fleet([url], origin=store, options=FleetOptions(deadline=20.0))
        try:
            assert backed.get_block(blocks[0][0]) == blocks[0][1]
        finally:
            backed.close()
    finally:
        fleet.close()
        liar.shutdown()


@contextmanager
def _hung():
    """The URL of a server that accepts connections (its backlog) but never answers."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    try:
        yield f"http://127.0.0.1:{hole.getsockname()[1]}"
    finally:
        hole.close()


def test_a_hung_server_cannot_make_a_read_hang(origin):
    store, blocks = origin
    with _hung() as url:
        fleet = Fleet([url], options=FleetOptions(deadline=1.0, hedge_after=0.2))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no good answer within 1.0s"):
            fleet.get_block(blocks[0][0])
        assert 0.9 < time.monotonic() - started < 2.0
        assert fleet.stats.deadline_failures == 1
        fleet.close()


class _Flood(_Quiet):
    """Answers every GET with more bytes than any valid block frame can have."""

    def do_GET(self):  # noqa: N802
        size = block.MAX_FRAME_SIZE + 1024 * 1024
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        try:
            for _ in range(size // (1024 * 1024)):
                self.wfile.write(b"\0" * (1024 * 1024))
        except OSError:
            pass  # the client hung up once it had seen enough


def test_an_oversized_answer_is_cut_off_and_fetched_elsewhere(tmp_path, origin):
    store, blocks = origin
    flood = ThreadingHTTPServer(("127.0.0.1", 0), _Flood)
    threading.Thread(target=flood.serve_forever, daemon=True).start()
    try:
        with ServerThread(store, tmp_path / "honest") as honest:
            fleet = Fleet([f"http://127.0.0.1:{flood.server_address[1]}", honest.url])
            for d, f in blocks[:10]:
                assert fleet.get_block(d) == f
            assert fleet.stats.failovers >= 1
            fleet.close()
    finally:
        flood.shutdown()


def test_a_hung_server_is_asked_last_and_does_not_take_the_fleets_threads(tmp_path, origin):
    """A server alive but never answering (stopped, its disk hung): once another server has
    outrun it, reads go to the others first, so its requests do not pile up on the fleet's
    threads (4 here) until every read, the other server's too, waits on it."""
    store, blocks = origin
    with _hung() as url, ServerThread(store, tmp_path / "c") as good:
        fleet = Fleet([url, good.url], options=FleetOptions(threads=2, hedge_after=0.05, deadline=5))
        owned = [(d, f) for d, f in blocks if rendezvous.rank([url, good.url], f"block {d}")[0] == url]
        for d, f in owned[:8] + [b for b in blocks if b not in owned][:2]:
            started = time.monotonic()
            assert fleet.get_block(d) == f
            assert time.monotonic() - started < 1.0
        fleet.close()


def test_a_server_that_cannot_be_reached_does_not_hold_an_absent_tag_to_the_deadline(tmp_path, origin):
    """No origin, one of three servers down: what the other two both say is absent is absent
    (after a second round), at once, not an outage at the deadline."""
    from lazyfs.errors import TagNotFound
    store, _ = origin
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    url = f"http://127.0.0.1:{dead.getsockname()[1]}"
    try:
        with ServerThread(store, tmp_path / "a") as a, ServerThread(store, tmp_path / "b") as b:
            fleet = Fleet([url, a.url, b.url], options=FleetOptions(deadline=5))
            started = time.monotonic()
            with pytest.raises(TagNotFound):
                fleet.get_tag("no/such", "tag")
            assert time.monotonic() - started < 1.5
            fleet.close()
    finally:
        dead.close()


class _Trickle(_Quiet):
    """A batch answer that says how long it is and then sends a byte every 0.3 s; single GETs
    get a 503 (so a read fails over to the honest server at once)."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", batchfmt.MEDIA_TYPE)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass

    def do_GET(self):  # noqa: N802
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()


def test_a_batch_that_trickles_is_cut_at_the_deadline_and_its_blocks_fetched_elsewhere(tmp_path, origin):
    """The socket's timeout bounds each read only: a server sending a byte now and then held a
    batch, and every read waiting on its blocks, for as long as it went on."""
    store, blocks = origin
    trickle = ThreadingHTTPServer(("127.0.0.1", 0), _Trickle)
    trickle.daemon_threads = True
    threading.Thread(target=trickle.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{trickle.server_address[1]}"
    try:
        with ServerThread(store, tmp_path / "c") as good:
            fleet = Fleet([url, good.url], options=FleetOptions(deadline=1.5, hedge_after=30))
            owned = [(d, f) for d, f in blocks if rendezvous.rank([url, good.url], f"block {d}")[0] == url][:4]
            items = [(d, len(block.decode(d, f))) for d, f in owned]
            started = time.monotonic()
            got = dict(fleet.fetch_blocks(items))
            assert time.monotonic() - started < 4.0
            assert got == {d: block.decode(d, f) for d, f in owned}
            fleet.close()
    finally:
        trickle.shutdown()
        trickle.server_close()

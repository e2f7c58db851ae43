"""The node cache on its own: injected fetch, single-flight, damaged files, a full disk."""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lazyfs.cache.nodecache import NodeCache
from lazyfs.errors import BlockFormatError, DigestMismatch, LazyfsError
from lazyfs.format import block


class FakeOrigin:
    """An in-memory fetch function: the cache needs no store and no network."""

    def __init__(self, blobs: dict[str, bytes], delay: float = 0.0):
        self.frames = {d: block.encode(data)[1] for d, data in blobs.items()}
        self.calls: list[str] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, digest: str, size: int) -> bytes:
        """The contract of a node cache fetch: verified bytes (here by the real decoder)."""
        with self.lock:
            self.calls.append(digest)
        time.sleep(self.delay)
        return block.decode(digest, self.frames[digest], expected_size=size)


def _blob(n: int, seed: int = 0) -> tuple[str, bytes]:
    data = hashlib.sha256(str(seed).encode()).digest() * (n // 32) + b"x" * (n % 32)
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def test_single_flight_and_counters(tmp_path):
    digest, data = _blob(100_000)
    origin = FakeOrigin({digest: data}, delay=0.2)
    cache = NodeCache(tmp_path, origin)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.read(digest, len(data), 10, 20)))
               for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert origin.calls == [digest]
    assert results == [data[10:30]] * 20
    s = cache.stats.snapshot()
    assert s["misses"] == 1 and s["hits"] == 19 and s["fetched_raw_bytes"] == len(data)
    # Where they waited: one demand fetch of ~0.2 s; the other 19 for it to arrive.
    assert 0.2e6 <= s["demand_us"] < 2e6
    assert s["waits"] == 19 and 0 < s["wait_us"] <= 19 * (s["demand_us"] + 100_000)


def test_wrong_bytes_from_origin_never_enter_the_cache(tmp_path):
    digest, data = _blob(5000)
    other_digest, other = _blob(5000, seed=1)
    origin = FakeOrigin({other_digest: other})
    origin.frames[digest] = origin.frames[other_digest]  # a server answering with the wrong block
    cache = NodeCache(tmp_path, origin)
    with pytest.raises(DigestMismatch):
        cache.read(digest, len(data), 0, 10)
    assert not os.path.exists(cache.path(digest))
    assert cache.stats.snapshot()["errors"] == 1


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty"])
def test_power_cut_leftovers_are_never_served(tmp_path, damage, caplog):
    """A rename that outran its data (power cut without fsync) leaves a short or garbage file under
    the final name; temp files may be left in tmp/. Neither is ever served."""
    digest, data = _blob(300_000)
    origin = FakeOrigin({digest: data})
    cache = NodeCache(tmp_path, origin)
    path = Path(cache.path(digest))
    path.parent.mkdir(parents=True, exist_ok=True)
    bad = {"truncated": data[:1000], "flipped": bytes([data[0] ^ 1]) + data[1:], "empty": b""}[damage]
    path.write_bytes(bad)
    old = tmp_path / "tmp" / ".part-leftover"
    old.write_bytes(data[:500])
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    young = tmp_path / "tmp" / ".part-in-progress"  # another daemon's write, right now
    young.write_bytes(data[:500])
    fresh = NodeCache(tmp_path, origin)  # the next daemon after the crash
    assert not old.exists() and young.exists()
    assert fresh.read(digest, len(data), 0, len(data)) == data
    assert origin.calls == [digest]
    assert fresh.stats.snapshot()["dropped_corrupt"] == 1
    fresh.flush()  # (the good block is written behind the read)
    assert path.read_bytes() == data
    assert f"dropping damaged cached block {digest}" in caplog.text  # the log line says what happened


def test_cache_survives_restart_without_fetching(tmp_path):
    digest, data = _blob(70_000)
    origin = FakeOrigin({digest: data})
    first = NodeCache(tmp_path, origin)
    first.read(digest, len(data), 0, 1)
    first.close()  # (as a daemon's unmount does: what it wrote behind its reads is on disk)
    again = NodeCache(tmp_path, origin)
    assert again.read(digest, len(data), 5, 5) == data[5:10]
    assert origin.calls == [digest]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs to fill the disk needs root")
def test_full_cache_disk_still_serves_correct_bytes(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        blobs = dict(_blob(200_000, seed=i) for i in range(4))
        origin = FakeOrigin(blobs)
        cache = NodeCache(small, origin)
        for digest, data in blobs.items():
            assert cache.read(digest, len(data), 0, len(data)) == data
        for digest, data in blobs.items():  # served again, from disk or the memory fallback
            assert cache.read(digest, len(data), 100, 50) == data[100:150]
        cache.flush()  # the writes behind the reads have landed (or been refused) now
        for digest, data in blobs.items():  # and after that
            assert cache.read(digest, len(data), 0, len(data)) == data
        assert cache.stats.snapshot()["disk_write_errors"] >= 1  # the disk did refuse some
        for f in (small / "blocks").rglob("*"):
            if f.is_file():
                assert "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest() in blobs
        assert list((small / "tmp").iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_fetch_errors_propagate_typed(tmp_path):
    digest, _ = _blob(10)

    def broken(d, size):
        raise LazyfsError(f"origin down for {d}")
    with pytest.raises(LazyfsError, match="origin down"):
        NodeCache(tmp_path, broken).read(digest, 10, 0, 10)


def test_block_evicted_by_another_process_is_fetched_again(tmp_path):
    digest, data = _blob(4000)
    origin = FakeOrigin({digest: data})
    cache = NodeCache(tmp_path, origin)
    assert cache.read(digest, len(data), 0, 4) == data[:4]
    cache.flush()
    os.unlink(cache.path(digest))
    assert cache.read(digest, len(data), 4, 4) == data[4:8]
    assert origin.calls == [digest, digest]


def test_prefetch_fetches_once_in_the_background(tmp_path):
    blobs = dict(_blob(3000 + i, seed=i) for i in range(6))
    origin = FakeOrigin(blobs, delay=0.05)
    cache = NodeCache(tmp_path, origin)
    wanted = [(d, len(b)) for d, b in blobs.items()]
    cache.prefetch(wanted)
    cache.prefetch(wanted)  # in flight or cached: nothing new starts
    for d, b in blobs.items():
        assert cache.read(d, len(b), 0, len(b)) == b
    cache.close()
    assert sorted(origin.calls) == sorted(blobs)
    s = cache.stats.snapshot()
    assert s["misses"] == 6 and s["prefetched"] >= 1


def test_a_claim_is_released_when_its_block_is_left_even_on_error(tmp_path):
    digest, data = _blob(10_000, seed=7)
    origin = FakeOrigin({digest: data})
    cache = NodeCache(tmp_path, origin, claim_wait=30)
    with pytest.raises(RuntimeError):
        with cache.claim(digest):
            assert cache.claim(digest) is None  # owned: nobody else may load it meanwhile
            raise RuntimeError("the batch broke")
    started = time.monotonic()
    assert cache.read(digest, len(data), 0, 4) == data[:4]  # no wait: the claim is gone
    assert time.monotonic() - started < 5 and origin.calls == [digest]


def test_a_claim_nobody_releases_cannot_block_readers_forever(tmp_path, caplog):
    digest, data = _blob(10_000, seed=8)
    origin = FakeOrigin({digest: data})
    cache = NodeCache(tmp_path, origin, claim_wait=0.3)
    stuck = cache.claim(digest)  # an owner that never finishes (a bug, or a hung thread)
    assert stuck is not None
    started = time.monotonic()
    assert cache.read(digest, len(data), 0, 4) == data[:4]
    assert 0.3 <= time.monotonic() - started < 5
    assert "loading elsewhere" in caplog.text and digest in caplog.text
    stuck.release()
    stuck.release()  # twice is harmless
    assert cache.read(digest, len(data), 4, 4) == data[4:8]


def test_a_block_fetched_twice_is_written_and_counted_once(tmp_path):
    """A reader gave up on a stuck claim and fetched the block itself; then the claim's owner
    brings it too. One file, counted once in the node's ledger (else early trims)."""
    from lazyfs.cache import cap
    digest, data = _blob(10_000, seed=11)
    cache = NodeCache(tmp_path, FakeOrigin({digest: data}), claim_wait=0.2)
    with cache.claim(digest):
        assert cache.read(digest, len(data), 0, 4) == data[:4]  # after 0.2 s, fetched here
        cache.complete(digest, len(data), data)  # the owner's batch arrives after all
    cache.complete(digest, len(data), data)  # (and once more, after its claim ended)
    cache.flush()
    assert cap.usage(tmp_path) == cap.usage_scan(tmp_path) == (1, len(data))


def test_readers_of_a_stuck_batch_give_up_on_it_together_not_one_wait_each(tmp_path):
    """A batch prefetch claimed ten blocks and hangs on its server: reading them one after
    another waits about one claim_wait in all, not ten."""
    blobs = dict(_blob(5000, seed=100 + i) for i in range(10))
    origin = FakeOrigin(blobs)
    cache = NodeCache(tmp_path, origin, claim_wait=0.5)
    stuck = [cache.claim(d) for d in blobs]
    started = time.monotonic()
    for digest, data in blobs.items():
        assert cache.read(digest, len(data), 0, 8) == data[:8]
    took = time.monotonic() - started
    assert 0.5 <= took < 2.5, f"{took:.1f} s"
    for claim in stuck:
        claim.release()


def test_a_block_another_process_touches_while_it_is_hashed_is_not_dropped(tmp_path):
    """Two mount daemons adopting one cached block at once: each marks it used (utime), which
    moves its change time while the other hashes it. Neither may take that for damage."""
    digest, data = _blob(16 << 20, seed=6)
    origin = FakeOrigin({digest: data})
    first = NodeCache(tmp_path, origin)
    first.read(digest, len(data), 0, 1)
    first.flush()
    path = first.path(digest)
    assert os.path.exists(path)
    for _ in range(10):
        # the other daemon's one utime, while this one hashes the 16 MiB (about 10 ms)
        other = threading.Timer(0.002, os.utime, (path,))
        other.start()
        cache = NodeCache(tmp_path, origin)  # a daemon started now adopts the file
        assert cache.read(digest, len(data), 1000, 10) == data[1000:1010]
        other.join()
        assert cache.stats.dropped_corrupt == 0
    assert len(origin.calls) == 1  # never fetched again either


@pytest.mark.parametrize("fresh", [False, True], ids=["verified", "found-at-start"])
def test_a_cached_block_that_cannot_be_read_is_dropped_and_fetched_again(tmp_path, caplog, fresh,
                                                                        monkeypatch):
    """Not a file any more (here a socket, which open() refuses with ENXIO, as a bad sector
    refuses with EIO): the read fetches the block again, instead of failing on it for good."""
    import socket
    digest, data = _blob(30_000, seed=4)
    origin = FakeOrigin({digest: data})
    cache = NodeCache(tmp_path, origin)
    assert cache.read(digest, len(data), 0, 10) == data[:10]
    cache.flush()
    path = cache.path(digest)
    os.unlink(path)
    monkeypatch.chdir(os.path.dirname(path))  # (a socket's path must be short)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.path.basename(path))
        if fresh:
            cache = NodeCache(tmp_path, origin)  # a daemon started since
        assert cache.read(digest, len(data), 100, 10) == data[100:110]
    assert len(origin.calls) == 2
    assert "dropping unreadable cached block" in caplog.text
    cache.flush()
    assert Path(path).read_bytes() == data


def test_a_manifest_giving_a_cached_block_another_size_gets_an_error_not_short_bytes(tmp_path):
    digest, data = _blob(30_000, seed=5)
    cache = NodeCache(tmp_path, FakeOrigin({digest: data}))
    assert cache.read(digest, len(data), 0, 10) == data[:10]  # (in memory, then on disk)
    for _ in range(2):
        with pytest.raises(BlockFormatError, match="not the 40000"):
            cache.read(digest, 40_000, 29_990, 20)
        cache.flush()


def test_a_manifest_giving_a_cached_block_another_size_never_drops_the_block(tmp_path):
    """Any image's publisher can give a digest the node holds another size: that is the
    manifest's fault, refused for its reads, and the shared block stays for every other image."""
    digest, data = _blob(30_000, seed=6)
    origin = FakeOrigin({digest: data})
    first = NodeCache(tmp_path, origin)
    assert first.read(digest, len(data), 0, 10) == data[:10]
    first.flush()
    other = NodeCache(tmp_path, origin)  # another daemon: the file is not verified by it yet
    with pytest.raises(LazyfsError):
        other.read(digest, 40_000, 0, 10)
    assert Path(other.path(digest)).read_bytes() == data
    assert other.stats.dropped_corrupt == 0
    os.utime(other.path(digest))  # (changed since it was verified: hashed again, at a wrong size)
    with pytest.raises(LazyfsError, match="not the 40000"):
        other.read(digest, 40_000, 0, 10)
    assert Path(other.path(digest)).read_bytes() == data and other.stats.dropped_corrupt == 0
    assert other.read(digest, len(data), 0, 10) == data[:10]
    assert origin.calls == [digest]


@pytest.mark.parametrize("how", ["in-place", "replaced", "touched"])
def test_a_verified_block_changed_on_disk_is_checked_again(tmp_path, caplog, how):
    digest, data = _blob(50_000, seed=9)
    origin = FakeOrigin({digest: data})
    cache = NodeCache(tmp_path, origin)
    assert cache.read(digest, len(data), 0, 10) == data[:10]
    cache.flush()
    path = Path(cache.path(digest))
    if how == "in-place":
        with open(path, "r+b") as f:
            f.write(b"\0" * 10)
    elif how == "replaced":  # a new file (new inode) under the same name
        tmp = tmp_path / "evil"
        tmp.write_bytes(b"\1" * len(data))
        os.replace(tmp, path)
    else:  # metadata only (as another daemon's gc bookkeeping does): still the block
        os.utime(path)
    assert cache.read(digest, len(data), 0, 10) == data[:10]
    changed = how != "touched"
    assert len(origin.calls) == (2 if changed else 1)
    assert cache.stats.dropped_corrupt == int(changed)
    assert ("changed on disk after it was verified" in caplog.text) == changed
    cache.flush()  # (a block fetched again is written behind the read, too)
    assert path.read_bytes() == data


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tiny tmpfs to fill the disk needs root")
def test_a_full_cache_disk_is_logged_once_and_used_again_when_it_has_room(tmp_path, caplog,
                                                                          monkeypatch):
    from lazyfs.cache import disk
    monkeypatch.setattr(disk, "DISK_RETRY", 0.0)  # try the disk on every block here
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        blobs = dict(_blob(100_000, seed=100 + i) for i in range(12))
        cache = NodeCache(small, FakeOrigin(blobs))
        with caplog.at_level(logging.WARNING, logger="lazyfs.cache"):
            for digest, data in blobs.items():
                assert cache.read(digest, len(data), 0, len(data)) == data
            refused = [r for r in caplog.records if "cannot write blocks" in r.getMessage()]
            assert len(refused) == 1 and cache.stats.disk_write_errors >= 8
            for f in (small / "blocks").rglob("*"):
                if f.is_file():
                    f.unlink()  # room again
            extra, data = _blob(100_000, seed=200)
            cache.fetch.frames[extra] = block.encode(data)[1]
            assert cache.read(extra, len(data), 0, 10) == data[:10]
            assert any("writing blocks to" in r.getMessage() for r in caplog.records)
            assert Path(cache.path(extra)).exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_memory_blocks_are_bounded_and_keep_a_loop_larger_than_memory_partly():
    """A workload read over and over that does not fit: plain LRU would evict each block just
    before its next use (no hit at all); what stays keeps hitting, and a new working set that
    fits takes over."""
    from lazyfs.cache.memory import MemoryBlocks
    mem = MemoryBlocks(capacity=40 * 1000)
    loop = [f"sha256:{i:064x}" for i in range(80)]  # twice what fits
    hits = 0
    for rnd in range(5):
        for d in loop:
            if mem.get(d) is None:
                mem.used(d)
                mem.put(d, b"x" * 1000)
            elif rnd > 0:
                hits += 1
            assert mem.bytes <= mem.capacity
    assert hits / (4 * len(loop)) >= 0.3
    fresh = [f"sha256:{i + 1000:064x}" for i in range(30)]  # fits: soon all hits
    for _ in range(12):
        for d in fresh:
            if mem.get(d) is None:
                mem.used(d)
                mem.put(d, b"y" * 1000)
    assert all(mem.get(d) is not None for d in fresh)


def _write_blocks(root: str, cap_bytes: int, seeds: range, errors) -> None:
    """One writer process: its own NodeCache on the shared directory, reading (so writing) blocks
    whose sizes are whole pages, so that a tmpfs charges exactly their bytes."""
    try:
        blobs = dict(_blob(4096 * (10 + s % 7), seed=s) for s in seeds)
        cache = NodeCache(root, FakeOrigin(blobs), cap_bytes=cap_bytes)
        for digest, data in blobs.items():
            assert cache.read(digest, len(data), 0, len(data)) == data
        # Blocks are written behind the reads: land them before this process exits (a fork
        # leaves with os._exit, which would kill the writers mid-write, reservations in flight).
        cache.close()
    except BaseException as exc:  # reported to the parent, which fails the test
        errors.put(repr(exc))
        raise


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs of its own: statvfs then tells the bytes on it at one instant (a walk of a
    directory that others write and evict in cannot)."""
    root = tmp_path / "fs"
    root.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(root)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a tmpfs (for an instantaneous count of bytes on disk)")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def _used(root) -> int:
    st = os.statvfs(root)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_the_cap_holds_under_concurrent_writers_and_the_ledger_stays_exact(tmpfs):
    """Four processes write 120 distinct blocks (about 6.4 MB) into one cache capped at 2 MB: the
    bytes on disk never pass the cap at any instant, every read is exact, and afterwards the
    ledger's running total equals a walk of the cache, file for file and byte for byte."""
    import multiprocessing
    from lazyfs.cache import cap

    limit = 2_000_000
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    writers = [ctx.Process(target=_write_blocks, args=(str(tmpfs), limit, range(i * 30, i * 30 + 30), errors))
               for i in range(4)]
    peak = 0
    for w in writers:
        w.start()
    try:
        while any(w.is_alive() for w in writers):
            peak = max(peak, _used(tmpfs))
            time.sleep(0.001)
    finally:
        for w in writers:
            w.join(timeout=60)
            if w.is_alive():
                w.kill()
    assert errors.empty(), errors.get()
    assert [w.exitcode for w in writers] == [0] * 4
    page = os.statvfs(tmpfs).f_frsize
    assert 0 < peak <= limit + page, f"the cache reached {peak} bytes under a {limit}-byte cap"  # + the ledger's page
    files, size = cap.usage_scan(tmpfs)
    assert 0 < size <= limit
    assert cap.usage(tmpfs) == (files, size)


def test_a_block_larger_than_the_cap_is_served_and_evicts_nothing(tmp_path, caplog):
    """The writers of the cache do without a file the cap cannot hold: a read gets its block
    from memory, the completer leaves the file to FUSE (fetching nothing for it), a kernel-path
    daemon serves through FUSE; nothing already cached is evicted for it."""
    from lazyfs.cache.completer import Completer
    from lazyfs.fs import daemon
    from lazyfs.format.manifest import Chunk

    small = dict(_blob(1000, seed=s) for s in range(3))
    (big, data), = [_blob(10_000, seed=9)]
    origin = FakeOrigin({**small, big: data})
    first = NodeCache(tmp_path, origin)
    for digest, blob in small.items():
        first.read(digest, len(blob), 0, 1)
    first.close()
    cache = NodeCache(tmp_path, origin, cap_bytes=5000)
    for _ in range(2):
        assert cache.read(big, len(data), 0, len(data)) == data
        cache.flush()
    assert origin.calls.count(big) == 1  # (kept in memory)
    assert not os.path.exists(cache.path(big))
    assert all(os.path.exists(cache.path(d)) for d in small) and cache.stats.evicted == 0
    assert caplog.text.count("blocks that large are served from memory") == 1

    completer = Completer(cache, tmp_path / "objects", background=True, idle=0).start()
    chunks = tuple(Chunk(d, len(b)) for d, b in small.items())
    try:
        completer.read("f" * 64, chunks + chunks)  # 6000 bytes
        time.sleep(1.5)
    finally:
        completer.stop()
    assert not (tmp_path / "objects").exists() and completer.stats.errors == 0

    args = daemon.DaemonArgs("sha256:" + "e" * 64, None, str(tmp_path), "/nowhere")
    assert not daemon._keep_image(cache, args, b"\0" * 6000, "wrote")
    assert list((tmp_path / "erofs").iterdir()) == []
    assert all(os.path.exists(cache.path(d)) for d in small) and cache.stats.evicted == 0


def test_blocks_the_completer_fetches_on_its_own_are_not_demand_misses(tmp_path):
    """Background completion fetches the chunks no read asked for: they count with the
    prefetches, not as misses reads waited on (``misses - prefetched``, ``demand_us``)."""
    from lazyfs.cache.completer import Completer
    from lazyfs.format.manifest import Chunk

    blobs = dict(_blob(20_000, seed=s) for s in range(3))
    origin = FakeOrigin(blobs, delay=0.05)
    cache = NodeCache(tmp_path, origin)
    chunks = tuple(Chunk(d, len(b)) for d, b in blobs.items())
    first = chunks[0]
    assert cache.read(first.digest, first.size, 0, 10) == blobs[first.digest][:10]  # the one read
    cache.flush()
    demand_us = cache.stats.demand_us
    completer = Completer(cache, tmp_path / "objects", background=True, idle=0).start()
    try:
        completer.read("f" * 64, chunks)
        deadline = time.monotonic() + 10
        while completer.stats.objects_written == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        completer.stop()
    assert completer.stats.objects_written == 1 and completer.stats.background_blocks == 2
    s = cache.stats.snapshot()
    assert s["misses"] == 3 and s["misses"] - s["prefetched"] == 1 and s["demand_us"] == demand_us


def test_the_ledger_counts_writes_and_reconciles_drift(tmp_path):
    from lazyfs.cache import cap

    blobs = dict(_blob(10_000 + s, seed=s) for s in range(5))
    cache = NodeCache(tmp_path, FakeOrigin(blobs))
    for digest, data in blobs.items():
        cache.read(digest, len(data), 0, 1)
    cache.flush()
    assert cap.usage(tmp_path) == cap.usage_scan(tmp_path) == (5, sum(map(len, blobs.values())))
    victim = next(p for p in (tmp_path / "blocks").rglob("*") if p.is_file())
    gone = victim.stat().st_size
    victim.unlink()  # removed behind the ledger's back: it drifts ...
    assert cap.usage(tmp_path) == (5, sum(map(len, blobs.values())))
    assert cap.ledger(tmp_path).reconcile()  # ... until a reconcile scans once
    assert cap.usage(tmp_path) == (4, sum(map(len, blobs.values())) - gone)
    (tmp_path / "usage").write_bytes(b"torn")  # a ledger torn by a crash is counted again
    assert cap.usage(tmp_path) == cap.usage_scan(tmp_path)


def test_a_walk_never_counts_a_landing_block_twice(tmp_path, monkeypatch):
    """A block gets its name while its bytes are still counted in flight; a walk of the cache
    (here a reconcile) that ran in between would find it on disk and add what is in flight,
    counting it twice for good. The rename happens inside the ledger's commit, so the walk waits."""
    from lazyfs.cache import cap
    digest, data = _blob(20_000)
    cache = NodeCache(tmp_path, FakeOrigin({digest: data}))
    assert cap.usage(tmp_path) == (0, 0)  # (the ledger exists before the write)
    renamed, walked = threading.Event(), threading.Event()
    real_rename = os.rename

    def rename(src, dst):
        real_rename(src, dst)
        if str(dst) == cache.path(digest):
            renamed.set()
            walked.wait(1.0)  # the walk's moment; it cannot start while the ledger is held

    def walk():
        if renamed.wait(30):
            cap.ledger(tmp_path).reconcile()
        walked.set()
    monkeypatch.setattr(os, "rename", rename)
    walker = threading.Thread(target=walk)
    walker.start()
    try:
        assert cache.read(digest, len(data), 0, len(data)) == data
        cache.flush()
    finally:
        walker.join(30)
        cache.close()
    assert renamed.is_set()
    assert cap.usage(tmp_path) == cap.usage_scan(tmp_path) == (1, len(data))


def test_a_miss_never_waits_on_the_disk(tmp_path, monkeypatch):
    """A block fetched for a read is answered from memory at once; its file is written behind
    the read (temp file, fsync, rename), and the cache directory (which the kernel data path
    reads itself) shows it only once it is durable."""
    digest, data = _blob(100_000)
    origin = FakeOrigin({digest: data})
    cache = NodeCache(tmp_path, origin)
    disk = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd):  # a disk that takes as long as the test lets it
        assert disk.wait(30)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", slow_fsync)
    started = time.monotonic()
    assert cache.read(digest, len(data), 0, len(data)) == data
    assert cache.read(digest, len(data), 5, 10) == data[5:15]  # from memory meanwhile
    assert time.monotonic() - started < 5.0  # the reads did not wait for the disk
    assert not os.path.exists(cache.path(digest))  # nothing under its name before it is durable
    assert origin.calls == [digest]
    disk.set()
    cache.flush()
    assert Path(cache.path(digest)).read_bytes() == data
    assert cache.stats.snapshot()["written_behind"] == 1
    cache.close()


def test_past_the_write_behind_bound_a_miss_writes_its_block_first(tmp_path, monkeypatch):
    from lazyfs.cache import landing
    monkeypatch.setattr(landing, "WRITE_BEHIND", 0)
    digest, data = _blob(50_000)
    cache = NodeCache(tmp_path, FakeOrigin({digest: data}))
    assert cache.read(digest, len(data), 0, 100) == data[:100]
    assert Path(cache.path(digest)).read_bytes() == data  # on disk before the read returned
    assert cache.stats.snapshot()["written_behind"] == 0


def test_held_blocks_are_served_from_memory_and_written_once_released(tmp_path):
    """A lazy restore's memory (hold): served from memory as it arrives, written into the cache
    only when released (the restored process's faults went quiet); past the room to hold,
    written as it comes."""
    blobs = dict(_blob(60_000, seed) for seed in range(3))
    (d0, b0), (d1, b1), (d2, b2) = blobs.items()
    origin = FakeOrigin(blobs)
    cache = NodeCache(tmp_path, origin)
    cache.hold([d0, d1, d2], room=len(b0) + len(b1))
    for digest, data in blobs.items():
        assert cache.read(digest, len(data), 0, len(data)) == data
    cache.flush()
    assert not os.path.exists(cache.path(d0)) and not os.path.exists(cache.path(d1))
    assert Path(cache.path(d2)).read_bytes() == b2  # past the room: written as it came
    assert cache.read(d1, len(b1), 10, 5) == b1[10:15]  # held: from memory
    cache.release_held()
    cache.flush()
    assert Path(cache.path(d0)).read_bytes() == b0 and Path(cache.path(d1)).read_bytes() == b1
    assert sorted(origin.calls) == sorted(blobs)  # each fetched once
    cache.close()


def test_close_writes_the_blocks_still_held(tmp_path):
    digest, data = _blob(70_000)
    cache = NodeCache(tmp_path, FakeOrigin({digest: data}))
    cache.hold([digest], room=1 << 20)
    assert cache.read(digest, len(data), 0, len(data)) == data
    assert not os.path.exists(cache.path(digest))
    cache.close()  # (a page server that exits before its process went quiet loses nothing)
    assert Path(cache.path(digest)).read_bytes() == data
    assert NodeCache(tmp_path, FakeOrigin({})).read(digest, len(data), 0, 9) == data[:9]


@pytest.mark.parametrize("content", ["exact", "short", "long", "other"])
def test_a_block_file_holds_the_block_only_with_exactly_its_bytes(tmp_path, content):
    from lazyfs.cache import disk
    digest, data = _blob(70_000, seed=7)
    on_disk = {"exact": data, "short": data[:-1], "long": data + b"\0",
               "other": data[:-1] + bytes([data[-1] ^ 1])}[content]
    path = tmp_path / "block"
    path.write_bytes(on_disk)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert disk.holds(fd, digest, len(data)) == (content == "exact")
    finally:
        os.close(fd)

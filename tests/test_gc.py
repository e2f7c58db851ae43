"""Garbage collection: mark from tags, sweep the rest, never beside a build, dry runs change nothing."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from imagebuilder.build import build
from lazyfs.cache import cap
from lazyfs.records import gc
from lazyfs.errors import LargerThanCache, StoreError, StoreUnavailable
from lazyfs.records import objects
from lazyfs.store.lease import Lease, LeaseConflict, held_when_free
from lazyfs.store.local import LocalStore
from tests.conftest import lazyfs_cli


def _rootfs(root: Path, content: dict[str, bytes]) -> Path:
    for name, data in content.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _age(store: LocalStore, seconds: float) -> None:
    old = time.time() - seconds
    for p in store.root.rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))


@pytest.fixture
def two_images(tmp_path):
    store = LocalStore(tmp_path / "store")
    shared = os.urandom(700_000)
    a = _rootfs(tmp_path / "a", {"shared": shared, "only-a": os.urandom(50_000)})
    b = _rootfs(tmp_path / "b", {"shared": shared, "only-b": os.urandom(60_000)})
    ra = build(f"dir:{a}", store, "gc/a:1")
    rb = build(f"dir:{b}", store, "gc/b:1")
    return store, ra, rb


def _blocks(result) -> set[str]:
    return {c.digest for e in result.manifest.entries for c in e.chunks}


def test_untagged_image_is_swept_shared_blocks_stay(two_images, tmp_path):
    store, ra, rb = two_images
    # Retag a away: its manifest and its own block are garbage; shared blocks are still b's.
    store._tag_path("gc/a", "1").unlink()
    _age(store, 7200)
    dry = gc.collect_store(store, grace=3600, dry_run=True)
    # An image's mount metadata record goes with it (and stays with b).
    assert ra.manifest.meta and rb.manifest.meta
    assert set(dry.blocks) == _blocks(ra) - _blocks(rb) and set(dry.manifests) == {ra.digest, ra.manifest.meta}
    assert store.has_block(next(iter(_blocks(ra) - _blocks(rb))))  # dry run changed nothing
    report = gc.collect_store(store, grace=3600)
    assert set(report.blocks) == _blocks(ra) - _blocks(rb)
    assert {b.digest for b in store.list_blocks()} == _blocks(rb)
    assert {m.digest for m in store.list_manifests()} == {rb.digest, rb.manifest.meta}
    assert report.bytes > 0
    # What is left still reads back completely.
    m = objects.read_manifest(store, rb.digest)
    for e in m.entries:
        for c in e.chunks:
            objects.fetch_block(store, c.digest, c.size)


def test_young_garbage_is_spared(two_images):
    store, ra, rb = two_images
    store._tag_path("gc/a", "1").unlink()
    report = gc.collect_store(store, grace=3600)
    assert report.blocks == [] and report.manifests == [] and report.spared_young > 0


def test_old_blocks_a_young_manifest_reuses_are_spared(two_images, tmp_path):
    """An image built a minute ago from old blocks, not tagged yet (a snapshot between its
    record and its tag, an untagged build): its manifest is spared for its age, and so must be
    every block it lists, however old."""
    store, ra, rb = two_images
    store._tag_path("gc/a", "1").unlink()
    _age(store, 7200)
    again = build(f"dir:{tmp_path / 'a'}", store)  # the same files: every block reused, untagged
    assert _blocks(again) == _blocks(ra)
    report = gc.collect_store(store, grace=3600)
    assert report.blocks == [] and report.manifests == []
    for c in (c for e in again.manifest.entries for c in e.chunks):
        objects.fetch_block(store, c.digest, c.size)
    objects.read_manifest_bytes(store, again.manifest.meta)  # its mount metadata too
    _age(store, 7200)  # once old and still untagged, it all goes
    assert set(gc.collect_store(store, grace=3600).blocks) == _blocks(ra) - _blocks(rb)


def test_gc_refuses_beside_a_running_build_and_vice_versa(two_images, tmp_path):
    store, ra, rb = two_images
    with Lease(store, "build", conflicts=("gc",)):
        with pytest.raises(LeaseConflict, match="build by pid"):
            gc.collect_store(store, grace=0)
    with Lease(store, "gc", conflicts=("build", "gc")):
        with pytest.raises(LeaseConflict, match="gc by pid"):
            build(f"dir:{_rootfs(tmp_path / 'c', {'x': b'y'})}", store, "gc/c:1")
    assert store.list_leases() == []


def test_a_snapshot_being_stored_waits_for_a_gc_instead_of_failing(two_images):
    """What a snapshot stores was dumped already: it waits out a gc (held_when_free), and a gc
    that comes later is refused while it stores."""
    store, _, _ = two_images
    said: list[str] = []
    gc_lease = Lease(store, "gc", conflicts=("build", "gc"))
    gc_lease.__enter__()
    timer = threading.Timer(1.0, gc_lease.__exit__, (None, None, None))
    timer.start()
    try:
        began = time.monotonic()
        with held_when_free(store, "build", ("gc",), say=said.append, every=0.1):
            waited = time.monotonic() - began
            with pytest.raises(LeaseConflict):
                gc.collect_store(store, grace=0)
    finally:
        timer.join()
    assert waited >= 0.9 and len(said) == 1 and "gc by pid" in said[0]
    assert store.list_leases() == []
    with Lease(store, "gc", conflicts=("build", "gc")):
        with pytest.raises(LeaseConflict, match="gc by pid"):
            with held_when_free(store, "build", ("gc",), patience=0.3, every=0.1):
                pass
    assert store.list_leases() == []


def test_stale_leases_are_ignored_and_removed(two_images):
    store, _, _ = two_images
    store.put_lease("build-crashed", json.dumps({"kind": "build", "host": "h", "pid": 1,
                                                 "refreshed": time.time() - 86400}).encode())
    report = gc.collect_store(store, grace=0)
    assert report.stale_leases == 1 and store.list_leases() == []


def test_node_cache_trim_lru(tmp_path):
    blocks = tmp_path / "cache" / "blocks" / "ab"
    blocks.mkdir(parents=True)
    now = time.time()
    for i in range(10):
        p = blocks / f"{i:064x}"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (now - 1000 + i, now - 1000 + i))  # block 0 least recently used
    report = cap.collect(tmp_path / "cache", 4500, dry_run=True)
    assert report.evicted == 6 and len(list(blocks.iterdir())) == 10
    report = cap.collect(tmp_path / "cache", 4500)
    assert sorted(p.name for p in blocks.iterdir()) == [f"{i:064x}" for i in range(6, 10)]


def test_room_for_a_file_larger_than_the_cap_is_refused_and_evicts_nothing(tmp_path):
    blocks = tmp_path / "cache" / "blocks" / "ab"
    blocks.mkdir(parents=True)
    for i in range(10):
        (blocks / f"{i:064x}").write_bytes(b"x" * 1000)
    with pytest.raises(LargerThanCache):
        with cap.room(tmp_path / "cache", 6000, 5000):
            pytest.fail("a file larger than the whole cache was given room")
    assert len(list(blocks.iterdir())) == 10
    assert cap.usage(tmp_path / "cache") == (10, 10_000)  # (nothing reserved either)


def test_cli(two_images, env_dirs, tmp_path):
    store, ra, rb = two_images
    out = lazyfs_cli("gc", "--store", store.root, "--grace", "0", "--dry-run", "--json")
    assert json.loads(out.stdout)["swept_blocks"] == 0  # everything is tagged
    out = lazyfs_cli("gc", "--node-cache", "--cache-dir", tmp_path / "nc", "--max-size", "1M", "--json")
    assert json.loads(out.stdout)["evicted"] == 0
    bad = lazyfs_cli("gc", "--node-cache", check=False)
    assert bad.returncode != 0 and "--max-size" in bad.stderr


@pytest.mark.parametrize("args, message", [
    (["--max-size", "1G", "--cache-dir", "CACHE"], "trim a node cache: add --node-cache"),
    (["--node-cache", "--max-size", "1G", "--store", "STORE"], "not with --node-cache"),
    (["--node-cache", "--max-size", "1G", "--grace", "bogus"], "not with --node-cache"),
    (["--store", "STORE", "--grace", "bogus"], "not a duration"),
    (["--store", "NOWHERE"], "no lazyfs store at"),
    (["--store", "NOWHERE", "--dry-run"], "no lazyfs store at"),
])
def test_gc_refuses_what_it_would_not_do_as_asked(two_images, tmp_path, args, message):
    """gc deletes: an option of the other kind of gc, a bad value or a store that is not there
    is refused before anything is read, written or removed (not the default store collected
    instead, not a new store made at a mistyped path)."""
    store, _, _ = two_images
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    paths = {"STORE": str(store.root), "CACHE": str(tmp_path / "nc"), "NOWHERE": str(tmp_path / "typo")}
    r = lazyfs_cli("gc", *[paths.get(a, a) for a in args], check=False)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before
    assert not (tmp_path / "typo").exists()


def test_a_dry_run_takes_no_lease(two_images, monkeypatch):
    """A dry run changes nothing in the store, not even a lease (a store it may only read)."""
    store, _, _ = two_images
    written = []
    monkeypatch.setattr(store, "put_lease", lambda name, data: written.append(name))
    report = gc.collect_store(store, grace=0, dry_run=True)
    assert report.dry_run and written == []
    gc.collect_store(store, grace=0)
    assert written  # (what the check above would have seen)


class _FlakyLeases:
    """A real store whose lease writes fail while ``down`` is set."""

    def __init__(self, inner):
        self.inner, self.down = inner, False

    def put_lease(self, name, data):
        if self.down:
            raise StoreUnavailable("store unreachable")
        return self.inner.put_lease(name, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_failing_lease_refresh_is_logged_once_per_outage(tmp_path, caplog):
    store = _FlakyLeases(LocalStore(tmp_path / "store"))
    with caplog.at_level(logging.WARNING, logger="lazyfs.lease"):
        with Lease(store, "build", conflicts=("gc",), refresh_every=0.05) as lease:
            store.down = True
            time.sleep(0.4)  # several failed refreshes
            failed = [r for r in caplog.records if "refresh failed" in r.getMessage()]
            assert len(failed) == 1 and lease.name in failed[0].getMessage()
            assert "lapses in" in failed[0].getMessage()
            store.down = False
            time.sleep(0.3)
        assert any("refreshed again" in r.getMessage() for r in caplog.records)


def test_work_whose_lease_lapsed_writes_nothing_that_would_reference_it(tmp_path, monkeypatch):
    """A lease not refreshed for its TTL is dead to gc, which may then sweep the blocks a build
    reuses: the build must not go on to write a manifest and a tag over them."""
    from lazyfs.store import lease as leases
    monkeypatch.setattr(leases, "LEASE_TTL", 0.3)
    store = _FlakyLeases(LocalStore(tmp_path / "store"))
    with Lease(store, "build", conflicts=("gc",), refresh_every=0.05) as lease:
        time.sleep(0.2)
        lease.check()  # refreshed all along
        store.down = True
        time.sleep(0.5)
        store.down = False
        time.sleep(0.2)  # refreshed again, but it had lapsed meanwhile
        with pytest.raises(StoreError, match="lapsed"):
            lease.check()


def test_a_young_record_that_cannot_be_read_stops_no_gc(two_images, caplog):
    """An untagged snapshot record, minutes old, pinning an image the store no longer has: gc
    keeps it and what it lists for their age, says so, and collects the rest."""
    from lazyfs.format import block
    from lazyfs.format import snapshot as snapfmt
    store, ra, rb = two_images
    store._tag_path("gc/a", "1").unlink()
    _age(store, 7200)
    digest, frame = block.encode(b"a page of memory")
    store.put_block(digest, frame)
    old = time.time() - 7200
    os.utime(store._block_path(digest), (old, old))  # an old block, kept only by the record
    snap = snapfmt.Snapshot("sha256:" + "7" * 64, "/run/lazyfs/snap/0123456789abcdef",
                            (snapfmt.SnapFile("criu/pages-1.img", 16, ((digest, 16),)),))
    record = objects.put_record(store, snapfmt.encode(snap))
    with caplog.at_level(logging.WARNING, logger="lazyfs.gc"):
        report = gc.collect_store(store, grace=3600)
    assert record in caplog.text and "cannot be read" in caplog.text
    assert set(report.blocks) == _blocks(ra) - _blocks(rb)  # the rest collected as ever
    assert store.has_block(digest) and objects.read_manifest_bytes(store, record)


def test_a_lease_lapses_across_a_suspend_and_a_gc_whose_own_lapsed_deletes_nothing(two_images, monkeypatch):
    """The monotonic clock stands still while a machine sleeps; the lease's clock does not. A
    build asleep past the TTL sees its lease lapsed, and a gc whose own lease lapsed mid-way
    (asleep, or its refreshes failing) stops before its next delete."""
    from lazyfs.store import lease as leases
    store, ra, rb = two_images
    store._tag_path("gc/a", "1").unlink()
    _age(store, 7200)
    boot = leases._clock
    slept = [0.0]
    monkeypatch.setattr(leases, "_clock", lambda: boot() + slept[0])
    with Lease(store, "build", conflicts=("gc",), refresh_every=3600) as build_lease:
        build_lease.check()
        slept[0] = leases.LEASE_TTL + 60  # a suspend: no refresh ran, the clock moved on
        with pytest.raises(StoreError, match="lapsed"):
            build_lease.check()
    slept[0] = 0.0
    blocks_before = set(d.digest for d in store.list_blocks())
    deletes = store.delete_manifest

    def asleep_after_the_first(digest):
        deletes(digest)
        slept[0] = leases.LEASE_TTL + 60

    monkeypatch.setattr(store, "delete_manifest", asleep_after_the_first)
    with pytest.raises(StoreError, match="lapsed"):
        gc.collect_store(store, grace=3600)
    assert set(d.digest for d in store.list_blocks()) == blocks_before  # no block deleted


class _SlowLeases(_FlakyLeases):
    """Lease writes that take ``slow`` seconds once it is set."""
    slow = 0.0

    def put_lease(self, name, data):
        time.sleep(self.slow)
        return self.inner.put_lease(name, data)


def test_a_refresh_in_flight_when_the_work_ends_does_not_write_the_lease_again(tmp_path):
    """A refresh still writing to a slow store when the build ends: the lease is deleted after
    it, not written again after the delete (every gc would then wait for its TTL)."""
    store = _SlowLeases(LocalStore(tmp_path / "store"))
    with Lease(store, "build", conflicts=("gc",), refresh_every=0.05):
        store.slow = 6.0  # longer than the 5 s the end waits for the refresh thread
        time.sleep(0.2)  # a refresh is writing now
    time.sleep(1.5)  # (until after that write would have landed)
    assert [name for name, _ in store.list_leases()] == []

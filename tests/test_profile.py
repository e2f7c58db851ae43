"""Startup profiles end to end: `lazyfs profile` records and publishes, a later mount prefetches
the profiled blocks before the workload asks for them, and a stale or wrong profile costs
bandwidth at most, never a wrong byte."""
from __future__ import annotations

import json
import os
import random
import time
import urllib.request
from pathlib import Path

import pytest

from lazyfs.format import profile as proffmt
from lazyfs.records import objects
from lazyfs.store.local import LocalStore
from tests.conftest import Mounted, busybox_rootfs, lazyfs_cli, needs_mount
from bench.servers import CacheServer

pytestmark = needs_mount
MiB = 1024 * 1024
WORKLOAD = ["sh", "-c", "cat /data/a /data/b > /dev/null"]


def _image(root: Path, seed: int = 0, tag: str = "prof/bb:1") -> Path:
    busybox_rootfs(root)
    (root / "data").mkdir(exist_ok=True)
    for i, (name, n) in enumerate([("a", 3 * MiB + 5), ("b", MiB), ("c", 2 * MiB)]):
        (root / "data" / name).write_bytes(random.Random(f"{seed}-{i}").randbytes(n))
    lazyfs_cli("build", f"dir:{root}", "--tag", tag)
    return root


def _profile(store: LocalStore, image_ref: str) -> proffmt.Profile:
    image = objects.resolve(store, image_ref)
    return proffmt.decode(objects.read_manifest_bytes(store, store.get_tag(*proffmt.tag_for(image))))


def _wait_prefetch(m: Mounted, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = m.stats()
        if s.get("prefetch", {}).get("done"):
            return s
        time.sleep(0.05)
    raise AssertionError(f"prefetch did not finish: {m.stats()}")


def _blocks_of(store, ref: str, path: str) -> set[str]:
    manifest = objects.read_manifest(store, objects.resolve(store, ref))
    entry = next(e for e in manifest.entries if e.path == path.encode())
    return {c.digest for c in entry.chunks}


def test_record_publish_prefetch_round_trip(env_dirs, tmp_path, monkeypatch):
    root = _image(tmp_path / "rootfs")
    out = lazyfs_cli("profile", "--runtime", "namespaces", "prof/bb:1", "--", *WORKLOAD)
    store = LocalStore(env_dirs["LAZYFS_STORE"])
    prof = _profile(store, "prof/bb:1")
    assert out.stdout.strip().splitlines()[-1] == store.get_tag(*proffmt.tag_for(prof.image))
    listed = [b.digest for b in prof.blocks]
    a, b, c = (_blocks_of(store, "prof/bb:1", f"data/{n}") for n in "abc")
    assert a | b <= set(listed) and not c & set(listed)  # what it read, not what it did not
    assert max(listed.index(d) for d in a) < min(listed.index(d) for d in b)  # in read order
    assert prof.meta["read_bytes"] >= 4 * MiB and prof.meta["argv"] == WORKLOAD
    shown = json.loads(lazyfs_cli("inspect", "prof/bb:1", "--json").stdout)["profile"]
    assert shown["blocks"] == len(listed) and shown["argv"] == WORKLOAD
    # The profile is not an image: `lazyfs images` does not list it, gc keeps it.
    assert "lazyfs-profile" not in lazyfs_cli("images").stdout
    assert "swept_manifests\": 0" in lazyfs_cli("gc", "--grace", "0s", "--json").stdout

    monkeypatch.setenv("LAZYFS_CACHE_DIR", str(tmp_path / "fresh-node-cache"))
    with Mounted("prof/bb:1", tmp_path / "mnt") as mnt:
        m = Mounted("prof/bb:1", mnt)
        s = _wait_prefetch(m)
        # Before the workload has read a byte: exactly the profiled blocks came from the store.
        assert s["reads"] == 0
        assert s["prefetch"]["fetched"] == len(listed) == s["store"]["block_gets"]
        assert s["cache"]["misses"] == len(listed) == s["cache"]["prefetched"]
        for name in "ab":
            assert (mnt / "data" / name).read_bytes() == (root / "data" / name).read_bytes()
        after = m.stats()
        assert after["store"]["block_gets"] == len(listed)  # the workload fetched nothing itself
        assert after["cache"]["hits"] > 0


def test_stale_or_wrong_profile_still_gives_correct_bytes(env_dirs, tmp_path, monkeypatch):
    _image(tmp_path / "v1", seed=1, tag="prof/bb:1")
    lazyfs_cli("profile", "--runtime", "namespaces", "prof/bb:1", "--", *WORKLOAD)
    # v2 changes /data/a but keeps busybox and /data/b: its own tag has no profile yet.
    root2 = _image(tmp_path / "v2", seed=2, tag="prof/bb:2")
    (root2 / "data" / "b").write_bytes((tmp_path / "v1" / "data" / "b").read_bytes())
    lazyfs_cli("build", f"dir:{root2}", "--tag", "prof/bb:2")
    store = LocalStore(env_dirs["LAZYFS_STORE"])
    old = _profile(store, "prof/bb:1")
    shared = {b.digest for b in old.blocks} & _all_blocks(store, "prof/bb:2")
    assert 0 < len(shared) < len(old.blocks)

    monkeypatch.setenv("LAZYFS_CACHE_DIR", str(tmp_path / "fresh-node-cache"))
    with Mounted("prof/bb:2", tmp_path / "mnt", "--profile", "prof/bb:1") as mnt:
        s = _wait_prefetch(Mounted("", mnt))
        assert s["prefetch"]["planned"] == len(shared)  # only blocks this image has
        for name in "abc":
            assert (mnt / "data" / name).read_bytes() == (root2 / "data" / name).read_bytes()
    # Without a profile of its own and no --profile: no prefetch at all.
    with Mounted("prof/bb:2", tmp_path / "mnt2") as mnt:
        assert "prefetch" not in Mounted("", mnt).stats()
    # A profile the user names must exist; the error says so before anything is mounted.
    (tmp_path / "mnt3").mkdir()
    res = lazyfs_cli("mount", "--profile", "prof/bb:2", "prof/bb:2", tmp_path / "mnt3", check=False)
    assert res.returncode != 0 and "lazyfs-profile" in res.stderr and not os.listdir(tmp_path / "mnt3")


def _all_blocks(store, ref):
    manifest = objects.read_manifest(store, objects.resolve(store, ref))
    return {c.digest for e in manifest.entries for c in e.chunks}


def test_prefetch_through_a_cache_server_uses_batches(env_dirs, tmp_path, monkeypatch):
    root = _image(tmp_path / "rootfs")
    lazyfs_cli("profile", "--runtime", "namespaces", "prof/bb:1", "--", *WORKLOAD)
    server = CacheServer(env_dirs["LAZYFS_STORE"], tmp_path / "server-cache").start()
    try:
        monkeypatch.setenv("LAZYFS_CACHE_DIR", str(tmp_path / "fresh-node-cache"))
        with Mounted("prof/bb:1", tmp_path / "mnt", "--server", server.url) as mnt:
            s = _wait_prefetch(Mounted("", mnt))
            assert s["prefetch"]["fetched"] == s["prefetch"]["planned"] > 0
            assert s["prefetch"]["failed"] == 0
            assert (mnt / "data" / "a").read_bytes() == (root / "data" / "a").read_bytes()
            assert Mounted("", mnt).stats()["store"]["block_gets"] == s["prefetch"]["planned"]
        text = urllib.request.urlopen(server.url + "/metrics", timeout=5).read().decode()
        batch = [line for line in text.splitlines()
                 if line.startswith("lazyfs_server_requests_total{") and "batch" in line]
        assert batch and float(batch[0].split()[-1]) >= 1, text
    finally:
        server.stop()


def test_profile_of_a_server_that_never_exits(env_dirs, tmp_path):
    """--duration stops the workload (as for an HTTP server) and still publishes what it read."""
    _image(tmp_path / "rootfs")
    t0 = time.monotonic()
    lazyfs_cli("profile", "--runtime", "namespaces", "--duration", "2s", "prof/bb:1", "--",
               "sh", "-c", "cat /data/b > /dev/null; sleep 60")
    assert time.monotonic() - t0 < 30
    store = LocalStore(env_dirs["LAZYFS_STORE"])
    prof = _profile(store, "prof/bb:1")
    assert _blocks_of(store, "prof/bb:1", "data/b") <= {b.digest for b in prof.blocks}
    # Without --duration, a workload that fails publishes nothing.
    res = lazyfs_cli("profile", "--runtime", "namespaces", "prof/bb:1", "--", "sh", "-c", "exit 3",
                     check=False)
    assert res.returncode != 0 and "exited with code 3" in res.stderr
    assert _profile(store, "prof/bb:1") == prof


def test_first_small_file_read_in_a_directory_fetches_its_siblings(env_dirs, tmp_path, monkeypatch):
    root = tmp_path / "rootfs"
    (root / "pkg").mkdir(parents=True)
    for i in range(20):
        (root / "pkg" / f"mod{i:02d}.pyc").write_bytes(random.Random(i).randbytes(3000 + i))
    (root / "pkg" / "big.bin").write_bytes(random.Random(99).randbytes(2 * MiB))  # not a small file
    lazyfs_cli("build", f"dir:{root}", "--tag", "prof/sib:1")
    for flag, expect_gets in (("--siblings", 20), ("--no-siblings", 1)):
        monkeypatch.setenv("LAZYFS_CACHE_DIR", str(tmp_path / f"cache{flag}"))
        with Mounted("prof/sib:1", tmp_path / f"mnt{flag}", flag) as mnt:
            m = Mounted("", mnt)
            assert (mnt / "pkg" / "mod00.pyc").read_bytes() == (root / "pkg" / "mod00.pyc").read_bytes()
            deadline = time.monotonic() + 10
            while m.stats()["store"]["block_gets"] < expect_gets and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            assert m.stats()["store"]["block_gets"] == expect_gets  # the 2 MiB file stays unfetched
            for i in range(20):
                name = f"mod{i:02d}.pyc"
                assert (mnt / "pkg" / name).read_bytes() == (root / "pkg" / name).read_bytes()
            assert m.stats()["store"]["block_gets"] == 20


def test_build_can_record_the_profile(env_dirs, tmp_path):
    root = busybox_rootfs(tmp_path / "rootfs")
    (root / "data").mkdir()
    (root / "data" / "a").write_bytes(random.Random(1).randbytes(MiB))
    res = lazyfs_cli("build", f"dir:{root}", "--tag", "prof/built:1",
                     "--profile-command", "sh -c 'cat /data/a > /dev/null'")
    store = LocalStore(env_dirs["LAZYFS_STORE"])
    prof = _profile(store, "prof/built:1")
    assert _blocks_of(store, "prof/built:1", "data/a") <= {b.digest for b in prof.blocks}
    assert res.stdout.strip().splitlines()[-1] == prof.image  # still prints the image digest
    bad = lazyfs_cli("build", f"dir:{root}", "--profile-command", "true", check=False)
    assert bad.returncode != 0 and "--tag" in bad.stderr


def test_a_profile_of_another_image_warns_unless_it_is_a_snapshots_working_set(caplog):
    """plan() keeps the blocks the image references either way; a startup profile recorded on
    another image says so, while a snapshot's working set (recorded on the snapshot, by design)
    does not fill every restore's log with that warning."""
    import hashlib
    from lazyfs.format.manifest import Chunk, Entry, EntryType, Manifest
    from lazyfs.records import profiles
    data = [b"one", b"two"]
    chunks = [Chunk("sha256:" + hashlib.sha256(d).hexdigest(), len(d)) for d in data]
    manifest = Manifest((Entry(b"f", EntryType.REG, mode=0o644, size=6, chunks=tuple(chunks)),), {}, 1000)
    image, other = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    listed = (proffmt.ProfileBlock(chunks[1].digest, 3, 0.1), proffmt.ProfileBlock("sha256:" + "c" * 64, 9, 0.2))
    want = [(chunks[1].digest, 3)]
    with caplog.at_level("WARNING", logger="lazyfs.profile"):
        assert profiles.plan(proffmt.Profile(image, listed), manifest, image) == want
        assert not caplog.records
        assert profiles.plan(proffmt.Profile(other, listed, {"kind": proffmt.WORKING_SET}), manifest, image) == want
        assert not caplog.records
        assert profiles.plan(proffmt.Profile(other, listed), manifest, image) == want
    assert [r.getMessage() for r in caplog.records] == [
        f"startup profile was recorded on {other}, not {image}: 1 of its 2 blocks are in this image"]


def test_a_trace_counts_from_its_first_read_or_from_another_clocks_start():
    """A startup profile's times count from the mount's first read; a snapshot working set's
    image blocks count from its page server's start, ``shift`` seconds before the mount's."""
    import hashlib
    from lazyfs.format import trace as tracefmt
    from lazyfs.format.manifest import Chunk, Entry, EntryType, Manifest
    from lazyfs.fs.index import ImageIndex
    from lazyfs.records import profiles
    data = [b"one", b"two"]
    chunks = [Chunk("sha256:" + hashlib.sha256(d).hexdigest(), len(d)) for d in data]
    index = ImageIndex(Manifest((Entry(b"", EntryType.DIR, mode=0o755),
                                 Entry(b"a", EntryType.REG, mode=0o644, size=3, chunks=chunks[:1]),
                                 Entry(b"b", EntryType.REG, mode=0o644, size=3, chunks=chunks[1:])),
                                {}, 1000))
    reads = [tracefmt.Read(1.0, "/a", 0, 3), tracefmt.Read(1.5, "/b", 0, 3)]
    assert [b.t for b in profiles.from_trace(index, reads)] == [0.0, 0.5]
    assert [b.t for b in profiles.from_trace(index, reads, shift=0.25)] == [1.25, 1.75]
    assert [b.t for b in profiles.from_trace(index, reads, shift=-1.25)] == [0.0, 0.25]  # never < 0


def test_a_first_touch_preempted_by_another_never_records_a_negative_time(monkeypatch):
    """Two threads touch new blocks at once: the one whose clock reading comes first but which
    takes the lock second must not be timed before the first touch (profiles refuse t < 0, and
    the start's whole contribution would be lost)."""
    import threading
    import types
    from lazyfs.records import profiles
    rec = profiles.Recorder()
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    clock = iter([100.0, 101.0])
    other = threading.Thread(target=rec.touched, args=(b, 1))

    def monotonic():
        now = next(clock)
        if now == 100.0:  # the first reader is preempted here: the other thread touches its block
            other.start()
            other.join(0.5)  # (held back by the lock where the clock is read under it)
        return now
    monkeypatch.setattr(profiles, "time", types.SimpleNamespace(monotonic=monotonic, time=time.time))
    rec.touched(a, 1)
    other.join()
    profile = rec.profile("sha256:" + "c" * 64)
    assert sorted(b.t for b in profile.blocks) == [0.0, 1.0]
    assert proffmt.decode(proffmt.encode(profile)) == profile

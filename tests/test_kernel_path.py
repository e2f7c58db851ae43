"""The kernel data path (lazyfs.fs.kernel): what it serves itself, what it leaves to the daemon,
how partly read files become kernel-served, and when it falls back to FUSE."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from lazyfs.cache import layout as cachelayout
from lazyfs.fs import kernel
from tests.conftest import Mounted, lazyfs_cli, lazyfs_mounts, needs_mount

pytestmark = [needs_mount, pytest.mark.skipif(kernel.unavailable() is not None,
                                              reason=f"kernel data path: {kernel.unavailable()}")]
SIZE = 5 * 1024 * 1024 + 7  # 11 chunks of 512 KiB


@pytest.fixture
def image(env_dirs, tmp_path):
    src = tmp_path / "rootfs"
    (src / "data").mkdir(parents=True)
    (src / "data" / "big.bin").write_bytes(os.urandom(SIZE))
    (src / "data" / "other.bin").write_bytes(os.urandom(SIZE))
    (src / "hello").write_text("hello\n")
    lazyfs_cli("build", f"dir:{src}", "--tag", "kp/img:1")
    return src


def _wait(pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.1)
    return pred()


def test_partly_read_then_completed_is_kernel_served_on_the_next_mount(image, tmp_path):
    want = (image / "data" / "big.bin").read_bytes()
    m = Mounted("kp/img:1", tmp_path / "a", "--data-path", "kernel", "--complete",
                "--readahead", "0", "--no-siblings")
    with m as mnt:
        with open(mnt / "data" / "big.bin", "rb") as f:
            f.seek(3 * 512 * 1024)
            assert f.read(100) == want[3 * 512 * 1024:][:100]
        assert m.stats()["store"]["block_gets"] == 1  # chunk-level laziness on this path too
        # After reads have been quiet for a while, the rest of the file arrives, and only it.
        assert _wait(lambda: m.stats()["complete"]["objects_written"] == 1)
        s = m.stats()
        assert s["complete"]["background_blocks"] == 10 and s["store"]["block_gets"] == 11
        assert s["complete"]["object_bytes"] == SIZE
        assert (mnt / "data" / "other.bin").stat().st_size == SIZE  # never read: never fetched
        assert s["store"]["block_gets"] == 11
    m = Mounted("kp/img:1", tmp_path / "b", "--data-path", "kernel")
    with m as mnt:
        assert (mnt / "data" / "big.bin").read_bytes() == want
        s = m.stats()
        assert s["data_path"] == "kernel"
        assert s["reads"] == 0 and s["store"]["block_gets"] == 0  # the kernel served every byte


def test_the_directories_the_kernel_serves_from_become_roots_alone(image, tmp_path, env_dirs):
    """The kernel serves these files without hashing them: a cache directory made earlier by
    someone else (a user's own mounts) is taken over before the kernel path uses it, and what a
    user could have put in it is not served."""
    cache = Path(env_dirs["LAZYFS_CACHE_DIR"])
    for name in ("tmp", "blocks", "objects"):
        (cache / name).mkdir(parents=True, exist_ok=True)
        os.chown(cache / name, 1000, 1000)
        os.chmod(cache / name, 0o777)
    # A user's file under the name of the block of /hello, holding other bytes of its size.
    planted = Path(cachelayout.block_path(cache, "sha256:" + hashlib.sha256(b"hello\n").hexdigest()))
    planted.parent.mkdir()
    planted.write_bytes(b"HELLO\n")
    for p in (planted, planted.parent):
        os.chown(p, 1000, 1000)
    # erofs/ a link to a user's directory: neither followed nor written through.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chown(elsewhere, 1000, 1000)
    os.chmod(elsewhere, 0o777)
    (cache / "erofs").symlink_to(elsewhere)
    with Mounted("kp/img:1", tmp_path / "a", "--data-path", "kernel") as mnt:
        assert (mnt / "hello").read_text() == "hello\n"
    for name in ("tmp", "blocks", "objects", "erofs"):
        st = (cache / name).lstat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o700), name
        assert stat.S_ISDIR(st.st_mode), name
    st = elsewhere.stat()
    assert (st.st_uid, st.st_mode & 0o777, os.listdir(elsewhere)) == (1000, 0o777, [])
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".dropped-")]


def test_what_a_user_left_in_cache_directories_root_took_over_before_is_dropped(image, tmp_path, env_dirs):
    """Directories made root's while they held a user's files (as mounts before lazyfs removed
    them did): a user's subdirectory of blocks/, and a user's EROFS image, are not used."""
    cache = Path(env_dirs["LAZYFS_CACHE_DIR"])
    with Mounted("kp/img:1", tmp_path / "a", "--data-path", "kernel") as mnt:  # makes erofs/
        assert (mnt / "hello").read_text() == "hello\n"
    images = list((cache / "erofs").iterdir())
    assert len(images) == 1
    images[0].write_bytes(b"not an EROFS image")
    os.chown(images[0], 1000, 1000)
    planted = Path(cachelayout.block_path(cache, "sha256:" + hashlib.sha256(b"hello\n").hexdigest()))
    planted.unlink()
    subdir = planted.parent
    os.rmdir(subdir)
    subdir.mkdir()
    planted.write_bytes(b"HELLO\n")
    for p in (planted, subdir):
        os.chown(p, 1000, 1000)
    with Mounted("kp/img:1", tmp_path / "b", "--data-path", "kernel") as mnt:
        assert (mnt / "hello").read_text() == "hello\n"
    assert images[0].stat().st_uid == 0 and subdir.stat().st_uid == 0
    # Root's files in root's directories, but written through a tmp/ a user could write: one of
    # them may be a temp file the user swapped before root renamed it.
    planted.write_bytes(b"HELLO\n")
    os.chown(cache / "tmp", 1000, 1000)
    os.chmod(cache / "tmp", 0o777)
    with Mounted("kp/img:1", tmp_path / "c", "--data-path", "kernel") as mnt:
        assert (mnt / "hello").read_text() == "hello\n"


def test_without_complete_a_partly_read_file_stays_partial(image, tmp_path):
    want = (image / "data" / "big.bin").read_bytes()
    m = Mounted("kp/img:1", tmp_path / "a", "--data-path", "kernel", "--readahead", "0",
                "--no-siblings")
    with m as mnt:
        with open(mnt / "data" / "big.bin", "rb") as f:
            assert f.read(100) == want[:100]
        time.sleep(3)  # longer than the completer's idle wait
        assert m.stats()["store"]["block_gets"] == 1
    m = Mounted("kp/img:1", tmp_path / "b", "--data-path", "kernel")
    with m as mnt:
        assert (mnt / "data" / "big.bin").read_bytes() == want  # the rest through the daemon
        s = m.stats()
        assert s["reads"] > 0 and s["store"]["block_gets"] == 10


def test_verbose_mount_and_stats_say_which_path_serves(image, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = lazyfs_cli("mount", "kp/img:1", mnt, "-v", "--data-path", "kernel")
    try:
        assert "data path: kernel" in out.stderr
        assert [e for e in lazyfs_mounts(str(tmp_path)) if e == str(mnt)]
        assert (mnt / "hello").read_text() == "hello\n"
        assert '"data_path": "kernel"' in lazyfs_cli("stats", mnt).stdout
    finally:
        lazyfs_cli("umount", mnt)
    assert lazyfs_mounts(str(tmp_path)) == []  # overlay, EROFS and FUSE mounts all gone
    out = lazyfs_cli("mount", "kp/img:1", mnt, "-v", "--data-path", "fuse")
    try:
        assert "data path: fuse" in out.stderr
        assert '"data_path": "fuse"' in lazyfs_cli("stats", mnt).stdout
    finally:
        lazyfs_cli("umount", mnt)


def test_umount_finishes_what_an_unmount_by_hand_left(image, tmp_path):
    """The overlay on the mountpoint unmounted by hand (or an unmount cut short after it): its
    metadata image and FUSE data layer, and the daemon, are still there, and `lazyfs umount`
    takes them down rather than answer "not mounted" and forget them."""
    from lazyfs.fs import mounts
    from lazyfs.proc import ident
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lazyfs_cli("mount", "kp/img:1", mnt, "--data-path", "kernel")
    try:
        pid = mounts.read_state(str(mnt)).pid
        subprocess.run(["umount", str(mnt)], check=True)
        assert len(lazyfs_mounts(str(tmp_path))) == 2 and not ident.exited(pid)
        assert mounts.is_stale(str(mnt))  # (what a run's cleanup and the node agent ask)
        lazyfs_cli("umount", mnt)
        assert lazyfs_mounts(str(tmp_path)) == []
        assert _wait(lambda: ident.exited(pid), 5)
        assert mounts.read_state(str(mnt)) is None
    finally:
        lazyfs_cli("umount", mnt, check=False)


def test_a_tree_the_layout_cannot_hold_falls_back_to_fuse(env_dirs, tmp_path):
    src = tmp_path / "rootfs"
    src.mkdir()
    (src / "file").write_text("x\n")
    os.setxattr(src / "file", "user.k", b"v")
    os.mknod(src / "whiteout-lookalike", 0o600 | 0o020000, os.makedev(0, 0))
    lazyfs_cli("build", f"dir:{src}", "--tag", "kp/odd:1")
    m = Mounted("kp/odd:1", tmp_path / "mnt", "--log-file", tmp_path / "mount.log")
    with m as mnt:
        assert m.stats()["data_path"] == "fuse"
        assert sorted(os.listdir(mnt)) == ["file", "whiteout-lookalike"]  # not hidden as a whiteout
        assert (mnt / "file").read_text() == "x\n"
    assert "overlayfs reads as a whiteout" in Path(tmp_path / "mount.log").read_text()


def test_a_miss_in_a_large_file_brings_its_next_blocks_in_one_batch(image, tmp_path):
    """A read in the middle of an 11-block file (a library's page fault) fetches its block, then
    the next --readahead blocks together; a later read among them waits for nothing."""
    want = (image / "data" / "big.bin").read_bytes()
    chunk = 512 * 1024
    m = Mounted("kp/img:1", tmp_path / "a", "--data-path", "kernel", "--no-siblings",
                "--readahead", "3")
    with m as mnt:
        with open(mnt / "data" / "big.bin", "rb") as f:
            f.seek(3 * chunk + 10)
            assert f.read(100) == want[3 * chunk + 10:][:100]
            assert _wait(lambda: m.stats()["cache"]["prefetched"] == 3)
            s = m.stats()
            assert s["store"]["block_gets"] == 4  # block 3, then 4, 5 and 6 in one batch
            assert s["cache"]["misses"] - s["cache"]["prefetched"] == 1
            f.seek(5 * chunk + 20)
            assert f.read(100) == want[5 * chunk + 20:][:100]
        s = m.stats()
        assert s["store"]["block_gets"] == 4 and s["cache"]["misses"] == 4


def _store(env_dirs):
    from lazyfs.store.local import LocalStore
    return LocalStore(env_dirs["LAZYFS_STORE"])


def test_a_cold_node_mounts_the_metadata_the_build_shipped(image, tmp_path, env_dirs):
    """Nothing is generated on the mount's start path: the EROFS image comes from the store, and
    it is byte for byte the image the node would have made from the manifest."""
    from dataclasses import replace
    from lazyfs.format import digest as digests, erofs, manifest as mf, metaimage
    from lazyfs.records import objects

    store = _store(env_dirs)
    digest = objects.resolve(store, "kp/img:1")
    manifest = objects.read_manifest(store, digest)
    assert manifest.meta is not None
    log = tmp_path / "mount.log"
    m = Mounted("kp/img:1", tmp_path / "mnt", "--data-path", "kernel", "--log-file", log)
    with m as mnt:
        assert m.stats()["metadata"] == "shipped"
        assert (mnt / "hello").read_text() == "hello\n"
        assert (mnt / "data" / "big.bin").read_bytes() == (image / "data" / "big.bin").read_bytes()
    text = log.read_text()
    assert "fetched the EROFS metadata image shipped with the image" in text
    assert "wrote the EROFS metadata image" not in text
    bare = replace(manifest, meta=None)
    expected = erofs.encode(bare, uuid=metaimage.uuid_for(digests.compute(mf.encode(bare))))
    assert cachelayout.erofs_image(env_dirs["LAZYFS_CACHE_DIR"], digest).read_bytes() == expected


@pytest.mark.parametrize("handed", ["exact", "wrong"])
def test_a_handed_over_manifest_is_checked_before_it_is_used(image, tmp_path, env_dirs, handed,
                                                              monkeypatch):
    """The node agent hands a mount the manifest it verified (no second fetch); the daemon
    hashes it again, and bytes that are not the manifest are dropped and fetched instead."""
    # The daemon in a fresh interpreter, as the CLI's would be: a fork of this test process
    # would run inside pytest's own output capture and logging.
    monkeypatch.setenv("LAZYFS_DAEMON_EXEC", "1")
    from lazyfs.fs import control, mounts
    from lazyfs.records import objects
    from lazyfs.source.spec import Source

    store = _store(env_dirs)
    digest = objects.resolve(store, "kp/img:1")
    raw = objects.read_manifest_bytes(store, digest)
    given = raw if handed == "exact" else raw[:-1] + bytes([raw[-1] ^ 1])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "mount.log"
    state = mounts.mount(digest, str(mnt), Source(env_dirs["LAZYFS_STORE"]), env_dirs["LAZYFS_CACHE_DIR"],
                         str(log), checked=True, data_path="kernel", manifest=given)
    try:
        s = control.query(str(mnt))
        assert s["manifest"] == ("handed" if handed == "exact" else "fetched")
        # The mount metadata record (shipped), and the manifest only when it was not handed over.
        assert s["store"]["manifest_gets"] == 1 + (handed == "wrong")
        assert (mnt / "data" / "big.bin").read_bytes() == (image / "data" / "big.bin").read_bytes()
        assert not state.kernel_layout().manifest.exists()  # read once, then removed
    finally:
        mounts.umount(str(mnt))
    assert ("the manifest handed to this mount is not" in log.read_text()) == (handed == "wrong")


def test_an_image_built_without_shipped_metadata_still_mounts(image, tmp_path, env_dirs):
    from dataclasses import replace
    from lazyfs.records import objects

    store = _store(env_dirs)
    old = replace(objects.read_manifest(store, objects.resolve(store, "kp/img:1")), meta=None)
    store.put_tag("kp/old", "1", objects.write_manifest(store, old))
    m = Mounted("kp/old:1", tmp_path / "mnt", "--data-path", "kernel")
    with m as mnt:
        assert m.stats()["metadata"] == "generated"
        assert (mnt / "data" / "other.bin").read_bytes() == (image / "data" / "other.bin").read_bytes()


def test_metadata_of_another_layout_version_is_made_again_on_the_node(image, tmp_path, env_dirs):
    """A record this node cannot use (another EROFS layout version, pinned by the manifest): the
    node makes its own image from the manifest it is already decoding, and serves the tree."""
    from dataclasses import replace
    from lazyfs.format import erofs, metaimage
    from lazyfs.records import objects

    store = _store(env_dirs)
    bare = replace(objects.read_manifest(store, objects.resolve(store, "kp/img:1")), meta=None)
    record = objects.put_record(store, metaimage.encode(erofs.encode(bare), layout=erofs.VERSION + 1))
    digest = objects.write_manifest(store, replace(bare, meta=record))
    store.put_tag("kp/next", "1", digest)
    log = tmp_path / "mount.log"
    m = Mounted("kp/next:1", tmp_path / "mnt", "--data-path", "kernel", "--log-file", log)
    with m as mnt:
        assert m.stats()["metadata"] == "generated" and m.stats()["data_path"] == "kernel"
        assert (mnt / "hello").read_text() == "hello\n"
        assert (mnt / "data" / "big.bin").read_bytes() == (image / "data" / "big.bin").read_bytes()
    assert f"ships EROFS layout v{erofs.VERSION + 1}" in log.read_text()
    assert cachelayout.erofs_image(env_dirs["LAZYFS_CACHE_DIR"], digest).exists()


@pytest.mark.parametrize("how", ["other-record", "garbage", "missing"])
def test_tampered_metadata_is_refused_in_one_line_and_nothing_is_mounted(image, tmp_path, env_dirs, how):
    """The kernel never parses an EROFS image the manifest does not pin, and no other data path
    stands in: the mount fails with one line, whatever --data-path says."""
    from lazyfs.format import block, erofs, manifest as mf, metaimage
    from lazyfs.records import objects

    store = _store(env_dirs)
    digest = objects.resolve(store, "kp/img:1")
    meta = objects.read_manifest(store, digest).meta
    path = next((Path(env_dirs["LAZYFS_STORE"]) / "manifests").rglob(meta[7:]))
    if how == "missing":
        path.unlink()
    else:  # a well-formed record (of an empty tree), or bytes that are no frame at all
        empty = mf.Manifest((mf.Entry(b"", mf.EntryType.DIR, 0o755),))
        frame = block.encode(metaimage.encode(erofs.encode(empty)))[1] if how == "other-record" else b"junk"
        path.write_bytes(frame)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for data_path in ("auto", "kernel"):
        r = lazyfs_cli("mount", "kp/img:1", mnt, "--data-path", data_path, check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1, r.stderr
        assert meta in lines[0] and "refusing to mount it" in lines[0]
        assert lazyfs_mounts(str(tmp_path)) == [] and os.listdir(mnt) == []
    assert not cachelayout.erofs_image(env_dirs["LAZYFS_CACHE_DIR"], digest).exists()
    r = lazyfs_cli("run", "--runtime", "namespaces", "kp/img:1", "--", "true", check=False)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "refusing" in r.stderr


def test_store_gc_keeps_an_images_metadata(image, env_dirs):
    from lazyfs.records import gc
    from lazyfs.records import objects

    store = _store(env_dirs)
    meta = objects.read_manifest(store, objects.resolve(store, "kp/img:1")).meta
    gc.collect_store(store, grace=0)
    assert objects.read_manifest_bytes(store, meta).startswith(b"LZFSMETA")

"""The mount: laziness, metadata without fetches, corruption → EIO, daemon life cycle."""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lazyfs.format.manifest import EntryType
from lazyfs.records import objects
from lazyfs.store.local import LocalStore
from tests.conftest import LAZYFS, ROOT, Mounted, lazyfs_cli, needs_mount

pytestmark = needs_mount


def _rootfs(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    for i in range(4):
        (root / "data" / f"large-{i}.bin").write_bytes(os.urandom(5 * 1024 * 1024 + i))
    (root / "etc").mkdir()
    (root / "etc" / "motd").write_text("hello from a lazy image\n")
    (root / "etc" / "other").write_text("another small file\n")
    os.setxattr(root / "etc" / "motd", "user.note", b"metadata only")
    for i in range(200):
        (root / "data" / f"small-{i}.txt").write_text(f"small file {i}\n")
    return root


@pytest.fixture
def big_image(env_dirs, tmp_path):
    src = _rootfs(tmp_path / "rootfs")
    lazyfs_cli("build", f"dir:{src}", "--tag", "lazy/big:1")
    store = LocalStore(env_dirs["LAZYFS_STORE"])
    manifest = objects.read_manifest(store, store.get_tag("lazy/big", "1"))
    return src, store, {e.path: e for e in manifest.entries}


def test_reading_one_small_file_fetches_only_its_block(big_image, tmp_path, data_path):
    src, store, entries = big_image
    # Speculative fetches off (readahead, siblings): this is the bare laziness contract.
    m = Mounted("lazy/big:1", tmp_path / "mnt", "--readahead", "0", "--no-siblings")
    with m as mnt:
        # Metadata of the whole tree: stat, readdir, readlink, xattrs — no block fetched.
        for dirpath, dirs, files in os.walk(mnt):
            for name in dirs + files:
                os.lstat(os.path.join(dirpath, name))
                os.listxattr(os.path.join(dirpath, name), follow_symlinks=False)
        assert os.getxattr(mnt / "etc" / "motd", "user.note") == b"metadata only"
        s = m.stats()
        # (and on the kernel path the mount metadata record the manifest names)
        assert s["store"]["block_gets"] == 0
        assert s["store"]["manifest_gets"] == 1 + (s["metadata"] == "shipped")
        assert (mnt / "etc" / "motd").read_text() == "hello from a lazy image\n"
        s = m.stats()
        motd = entries[b"etc/motd"]
        assert s["store"]["block_gets"] == len(motd.chunks) == 1
        assert s["cache"]["fetched_raw_bytes"] == motd.size
        assert s["store"]["block_bytes"] == store.block_size(motd.chunks[0].digest)
        total_blocks = {c.digest for e in entries.values() for c in e.chunks}
        assert len(total_blocks) > 20  # the image really is much larger than what was fetched
        # Reading part of a multi-block file fetches just the blocks under the read.
        with open(mnt / "data" / "large-2.bin", "rb") as f:
            f.seek(2 * 1024 * 1024 + 10)
            assert f.read(100) == (src / "data" / "large-2.bin").read_bytes()[2 * 1024 * 1024 + 10:][:100]
        assert m.stats()["store"]["block_gets"] == 2


def test_readahead_fetches_the_following_blocks_in_the_background(big_image, tmp_path):
    src, store, entries = big_image
    large = entries[b"data/large-2.bin"]
    assert len(large.chunks) >= 4
    # The daemon's readahead follows the reads that reach it: through FUSE the kernel's own
    # readahead makes a 100-byte read sequential at once (on the kernel path, overlayfs sends
    # one 16 KiB read, and readahead starts with the second).
    m = Mounted("lazy/big:1", tmp_path / "mnt", "--readahead", "2", "--data-path", "fuse")
    with m as mnt:
        with open(mnt / "data" / "large-2.bin", "rb") as f:
            assert f.read(100) == (src / "data" / "large-2.bin").read_bytes()[:100]
        # The mount's stats read the cache's counters before the store's: a prefetch starting
        # in between shows in the store's gets and not yet in the cache's, so wait for both.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            s = m.stats()
            if s["store"]["block_gets"] >= 3 and s["cache"]["prefetched"] >= 2:
                break
            time.sleep(0.05)
        time.sleep(0.2)  # (and nothing more comes)
        s = m.stats()
        assert s["store"]["block_gets"] == 3  # the block read, and the next two
        assert s["cache"]["prefetched"] == 2
        assert (mnt / "data" / "large-2.bin").read_bytes() == (src / "data" / "large-2.bin").read_bytes()


def test_whole_image_reads_back_exactly_and_cache_is_shared(big_image, tmp_path, env_dirs, data_path):
    src, store, entries = big_image
    with Mounted("lazy/big:1", tmp_path / "mnt") as mnt:
        for path, e in entries.items():
            if e.type == EntryType.REG:
                assert (mnt / os.fsdecode(path)).read_bytes() == (src / os.fsdecode(path)).read_bytes()
    # A second image sharing the content, mounted on the same node: nothing fetched again.
    lazyfs_cli("build", f"dir:{src / 'data'}", "--tag", "lazy/data:1")
    m = Mounted("lazy/data:1", tmp_path / "mnt2")
    with m as mnt:
        assert (mnt / "large-0.bin").read_bytes() == (src / "data" / "large-0.bin").read_bytes()
        s = m.stats()
        assert s["store"]["block_gets"] == 0 and s["data_path"] == data_path
        if data_path == "fuse":
            assert s["cache"]["hits"] > 0
        else:  # the first mount completed the object: the kernel serves it, the daemon sees nothing
            assert s["reads"] == 0 and s["cache"]["hits"] == 0


def _corrupt_block(store: LocalStore, digest: str) -> None:
    path = store._block_path(digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_and_missing_blocks_give_eio_and_a_log_line(big_image, tmp_path, env_dirs, data_path):
    src, store, entries = big_image
    bad = entries[b"etc/motd"].chunks[0].digest
    _corrupt_block(store, bad)
    large = entries[b"data/large-1.bin"]
    gone = large.chunks[3].digest
    gone_at = sum(c.size for c in large.chunks[:3]) + 5
    store._block_path(gone).unlink()
    with Mounted("lazy/big:1", tmp_path / "mnt", "--log-file", tmp_path / "mount.log") as mnt:
        with pytest.raises(OSError) as exc:
            (mnt / "etc" / "motd").read_bytes()
        assert exc.value.errno == errno.EIO
        assert (mnt / "etc" / "other").read_text() == "another small file\n"
        with open(mnt / "data" / "large-1.bin", "rb") as f:
            assert f.read(1024) == (src / "data" / "large-1.bin").read_bytes()[:1024]
            f.seek(gone_at)
            with pytest.raises(OSError) as exc:
                f.read(10)
            assert exc.value.errno == errno.EIO
        # The mount keeps answering after errors.
        assert sorted(os.listdir(mnt)) == ["data", "etc"]
    log = (tmp_path / "mount.log").read_text()
    assert bad in log and "etc/motd" in log
    assert gone in log and "large-1.bin" in log
    # Nothing bad entered the node cache.
    cache_files = {p.name for p in Path(env_dirs["LAZYFS_CACHE_DIR"], "blocks").rglob("*") if p.is_file()}
    assert bad[7:] not in cache_files and gone[7:] not in cache_files
    for name in cache_files:
        data = next(Path(env_dirs["LAZYFS_CACHE_DIR"], "blocks").rglob(name)).read_bytes()
        assert hashlib.sha256(data).hexdigest() == name


def test_mount_outlives_its_shell_and_umount_leaves_no_process(big_image, tmp_path, env_dirs):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # The shell that mounts exits at once, as a user's login shell or a script would.
    cmd = " ".join(LAZYFS) + f" mount lazy/big:1 {mnt}; exit 0"
    subprocess.run(["sh", "-c", cmd], check=True, cwd=ROOT, capture_output=True, env=os.environ)
    time.sleep(0.5)
    assert (mnt / "etc" / "motd").read_text() == "hello from a lazy image\n"
    from lazyfs.fs.mounts import read_state
    state = read_state(str(mnt))
    assert state is not None and os.path.exists(f"/proc/{state.pid}")
    lazyfs_cli("umount", mnt)
    assert not os.path.ismount(mnt)
    # Gone, or exited and waiting for init to reap it (a zombie holds no mount or descriptor).
    try:
        assert Path(f"/proc/{state.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        pass
    # Any process naming the mountpoint: an exec'd daemon or one forked from `lazyfs mount`.
    leftovers = subprocess.run(["pgrep", "-f", str(mnt)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


@pytest.mark.parametrize("recorded", ["start", "none"])
def test_umount_signals_the_daemon_never_a_process_that_took_its_pid(big_image, tmp_path, recorded):
    """A mount's state names its daemon by pid and start time: by the unmount the pid may be
    another process's. One of a state written before the start time was kept (``none``) is not
    the daemon's unless it has the daemon's name, and is not signalled even then."""
    import json
    from lazyfs.fs import mounts
    from lazyfs.proc import ident
    mnt = tmp_path / "mnt"
    with Mounted("lazy/big:1", mnt):
        daemon = mounts.read_state(str(mnt)).pid
        other = subprocess.Popen(["sleep", "60"])  # what has the daemon's pid, for the state
        try:
            path = mounts._state_file(str(mnt))
            raw = json.loads(path.read_text())
            raw["pid"] = other.pid
            if recorded == "start":
                assert raw["start"] == ident.proc_start(daemon)  # the daemon, for good
            else:
                raw.pop("start", None)
            path.write_text(json.dumps(raw))
            mounts.umount(str(mnt), timeout=1.0)
            assert other.poll() is None  # neither waited for nor signalled
        finally:
            other.kill()
            other.wait()
        assert ident.wait_gone(daemon, 10)  # (the daemon itself exits with its mount)


def test_lazy_umount_of_a_busy_mount_leaves_its_readers_served(big_image, tmp_path, data_path):
    """`umount --lazy` detaches at once; the daemon serves what is still open, and exits
    once it is closed (it was killed 15 s after the unmount, failing those reads)."""
    from lazyfs.fs import mounts
    from lazyfs.proc import ident
    src, _, _ = big_image
    want = (src / "data" / "large-1.bin").read_bytes()
    mnt = tmp_path / "mnt"
    m = Mounted("lazy/big:1", mnt, "--readahead", "0", "--no-siblings")
    with m:
        pid = mounts.read_state(str(mnt)).pid
        with open(mnt / "data" / "large-1.bin", "rb") as f:
            assert f.read(10) == want[:10]
            t0 = time.monotonic()
            lazyfs_cli("umount", "--lazy", mnt)
            assert time.monotonic() - t0 < 10
            assert not os.path.ismount(mnt) and not ident.exited(pid)
            f.seek(len(want) - 10)
            assert f.read() == want[-10:]  # a block the daemon fetches now
        assert ident.wait_gone(pid, 10)


def test_a_mount_state_is_written_whole_under_its_name_never_through_it(big_image, tmp_path):
    """The state file is renamed into place: a reader never sees it half written, and whatever
    was at its name (here a link to another file) is replaced, not written through."""
    from lazyfs.fs import mounts
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    path = mounts._state_file(str(mnt))
    path.parent.mkdir(parents=True)
    other = tmp_path / "other"
    other.write_text("someone else's file\n")
    path.symlink_to(other)
    with Mounted("lazy/big:1", mnt):
        assert not path.is_symlink() and mounts.read_state(str(mnt)).mountpoint == str(mnt)
        assert other.read_text() == "someone else's file\n"
        assert [p.name for p in path.parent.iterdir() if p.name.startswith(".part-")] == []


def test_daemon_keeps_none_of_the_callers_descriptors(big_image, tmp_path):
    """A caller reading the mount command's output (or any pipe it handed down) must see EOF
    when the command exits, not when the daemon does."""
    import select
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r, w = os.pipe()
    proc = subprocess.Popen([*LAZYFS, "mount", "lazy/big:1", str(mnt)], cwd=ROOT, pass_fds=(w,),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(w)
    try:
        out, err = proc.communicate(timeout=60)  # returns only once nobody holds stdout/stderr
        assert proc.returncode == 0, err
        ready, _, _ = select.select([r], [], [], 5)
        assert ready and os.read(r, 1) == b""  # EOF: the daemon did not inherit the pipe
        assert (mnt / "etc" / "motd").read_text() == "hello from a lazy image\n"
    finally:
        os.close(r)
        lazyfs_cli("umount", mnt, check=False)


def test_mount_errors_are_clear(big_image, tmp_path):
    (tmp_path / "mnt").mkdir()
    proc = lazyfs_cli("mount", "lazy/nope:1", tmp_path / "mnt", check=False)
    assert proc.returncode != 0 and "lazy/nope:1 not found" in proc.stderr
    proc = lazyfs_cli("mount", "lazy/big:1", tmp_path / "missing", check=False)
    assert proc.returncode != 0 and "not a directory" in proc.stderr
    proc = lazyfs_cli("umount", tmp_path / "mnt", check=False)
    assert proc.returncode != 0 and "not mounted" in proc.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "precious").write_text("x")
    proc = lazyfs_cli("mount", "lazy/big:1", tmp_path / "full", check=False)
    assert proc.returncode != 0 and "is not empty" in proc.stderr


def test_killed_daemon_is_detected_and_remounted(big_image, tmp_path, data_path):
    from lazyfs.cache import layout
    mnt = tmp_path / "mnt"
    src, _, entries = big_image
    m = Mounted("lazy/big:1", mnt)
    with m:
        from lazyfs.fs.mounts import read_state
        assert (mnt / "data" / "large-3.bin").read_bytes() == (src / "data" / "large-3.bin").read_bytes()
        # Blocks land on disk behind the reads that fetched them; a crash loses the ones still
        # on their way (they are fetched again). What landed must survive it.
        landed = [layout.block_path(os.environ["LAZYFS_CACHE_DIR"], c.digest)
                  for c in entries[b"data/large-3.bin"].chunks]
        deadline = time.monotonic() + 30
        while not all(map(os.path.exists, landed)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(map(os.path.exists, landed))
        os.kill(read_state(str(mnt)).pid, 9)
        time.sleep(0.3)
        if data_path == "fuse":
            with pytest.raises(OSError) as exc:
                os.listdir(mnt)
            assert exc.value.errno == errno.ENOTCONN
        else:
            # The kernel still serves the tree; data that comes through the daemon fails.
            assert sorted(os.listdir(mnt)) == ["data", "etc"]
            assert (mnt / "data" / "large-0.bin").stat().st_size == 5 * 1024 * 1024
            with pytest.raises(OSError):
                (mnt / "data" / "large-0.bin").read_bytes()
        proc = lazyfs_cli("mount", "lazy/big:1", mnt)
        assert "daemon behind this mount is gone" in proc.stderr  # says what it cleaned up
        assert (mnt / "data" / "large-3.bin").read_bytes() == (src / "data" / "large-3.bin").read_bytes()
        assert m.stats()["store"]["block_gets"] == 0  # the node cache survived the crash


def test_inode_numbers_are_stable_across_mounts(big_image, tmp_path, data_path):
    from lazyfs.format import erofs

    def inodes(mnt):
        return {os.path.relpath(os.path.join(d, n), mnt): os.lstat(os.path.join(d, n)).st_ino
                for d, dirs, files in os.walk(mnt) for n in dirs + files}
    with Mounted("lazy/big:1", tmp_path / "a") as mnt:
        first = inodes(mnt)
        # The manifest's numbering through FUSE; the EROFS image's nids on the kernel path.
        assert os.stat(mnt).st_ino == (1 if data_path == "fuse" else erofs.FIRST_INODE // 32)
    with Mounted("lazy/big:1", tmp_path / "b") as mnt:
        assert inodes(mnt) == first
    assert len(set(first.values())) == len(first)  # no hardlinks here: all distinct


def test_foreground_mount_stays_attached_until_unmounted(big_image, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([*LAZYFS, "mount", "--foreground", "lazy/big:1", str(mnt)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (mnt / "etc" / "motd").read_text() == "hello from a lazy image\n"
        assert proc.poll() is None  # still attached
        subprocess.run(["fusermount", "-u", str(mnt)], check=True)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["fusermount", "-u", "-z", str(mnt)], capture_output=True)
    assert "mounting lazy/big:1" in proc.stderr.read()


def test_concurrent_readers_on_a_cold_cache_get_exact_bytes(big_image, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    src, store, entries = big_image
    files = [p for p, e in entries.items() if e.type == EntryType.REG]
    m = Mounted("lazy/big:1", tmp_path / "mnt")
    with m as mnt:
        def check(path: bytes) -> bool:
            rel = os.fsdecode(path)
            return (mnt / rel).read_bytes() == (src / rel).read_bytes()
        with ThreadPoolExecutor(16) as pool:
            assert all(pool.map(check, files * 3))
        s = m.stats()
    unique = {c.digest for e in entries.values() for c in e.chunks}
    assert s["store"]["block_gets"] == len(unique)  # single-flight: each block fetched once


def test_full_node_cache_disk_still_reads_correctly(big_image, tmp_path):
    src, store, entries = big_image
    small = tmp_path / "small-cache"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        with Mounted("lazy/big:1", tmp_path / "mnt", "--cache-dir", small, "--log-file",
                     tmp_path / "m.log") as mnt:
            for i in range(4):  # 20 MiB through a 1 MiB cache disk
                assert (mnt / "data" / f"large-{i}.bin").read_bytes() == \
                    (src / "data" / f"large-{i}.bin").read_bytes()
        assert "serving them from memory" in (tmp_path / "m.log").read_text()
        for f in (small / "blocks").rglob("*"):
            if f.is_file():
                assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)


@pytest.mark.parametrize("exec_path", [False, True], ids=["forked", "exec"])
def test_daemon_started_forked_or_as_a_fresh_interpreter(big_image, tmp_path, exec_path):
    """Both ways of starting the daemon serve the same mount with the same options: the exec
    path gets them back from DaemonArgs.argv() (LAZYFS_DAEMON_EXEC=1 forces it)."""
    from lazyfs.fs.mounts import read_state
    src, _, _ = big_image
    trace = tmp_path / "trace.jsonl"
    env = {"LAZYFS_DAEMON_EXEC": "1"} if exec_path else {}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lazyfs_cli("mount", "lazy/big:1", mnt, "--trace", trace, "--readahead", "0", "--no-siblings",
               "--deadline", "7s", env=env)
    try:
        assert (mnt / "etc" / "motd").read_bytes() == (src / "etc" / "motd").read_bytes()
        state = read_state(str(mnt))
        cmdline = Path(f"/proc/{state.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        assert (b"lazyfs.fs.daemon" in cmdline) == exec_path
        assert Path(f"/proc/{state.pid}/comm").read_text() == "lazyfs-mount\n"  # either way
        if exec_path:
            assert b"--deadline=7.0" in cmdline
            assert b"--no-siblings" in cmdline and cmdline[-1] == str(mnt).encode()
        from lazyfs.fs import control
        assert control.query(str(mnt))["store"]["block_gets"] == 1  # no readahead, no siblings
        assert '"/etc/motd"' in trace.read_text()
    finally:
        lazyfs_cli("umount", mnt, check=False)


def test_a_cached_block_rewritten_on_disk_is_never_served(big_image, tmp_path, env_dirs):
    """docs/security.md: on the FUSE path a block file that changed after the mount verified it is
    verified again before any byte of it reaches the kernel; rewritten bytes are dropped and
    fetched again. (On the kernel path the kernel reads the node cache directly: the cache
    directory is trusted, root-only, and --data-path fuse is the opt-in re-verification.)"""
    src, _, entries = big_image
    motd = entries[b"etc/motd"].chunks[0].digest
    cached = Path(env_dirs["LAZYFS_CACHE_DIR"], "blocks", motd[7:9], motd[7:])
    with Mounted("lazy/big:1", tmp_path / "mnt", "--log-file", tmp_path / "mount.log",
                 "--data-path", "fuse") as mnt:
        good = (mnt / "etc" / "motd").read_bytes()
        assert good == (src / "etc" / "motd").read_bytes()
        deadline = time.monotonic() + 10  # the block is written behind the read that fetched it
        while not cached.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cached.exists()
        with open(cached, "r+b") as f:  # in place: same inode, same size, other bytes
            f.write(b"X" * len(good))
        Path("/proc/sys/vm/drop_caches").write_text("3\n")  # the kernel must ask the daemon again
        assert (mnt / "etc" / "motd").read_bytes() == good
        assert Mounted("", mnt).stats()["cache"]["dropped_corrupt"] == 1
    assert "changed on disk after it was verified" in (tmp_path / "mount.log").read_text()
    assert cached.read_bytes() == good  # the refetched block replaced it


def test_a_full_cache_disk_degrades_to_a_bounded_memory_cache(env_dirs, tmp_path):
    """The node cache on a disk with no room (8 MiB tmpfs) under 8 readers going through 116 MB,
    three times with the page cache dropped: exact bytes throughout, one log line for the
    outage (not one per block), memory within its bound."""
    from lazyfs.cache.nodecache import MEMORY_FALLBACK
    root = tmp_path / "rootfs"
    root.mkdir()
    want = {}
    for i in range(4):
        data = os.urandom(29 * 1024 * 1024)
        (root / f"f{i}").write_bytes(data)
        want[f"f{i}"] = hashlib.sha256(data).hexdigest()
    lazyfs_cli("build", f"dir:{root}", "--tag", "full/disk:1")
    cache = Path(env_dirs["LAZYFS_CACHE_DIR"])
    cache.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(cache)], check=True)
    try:
        log = tmp_path / "mount.log"
        with Mounted("full/disk:1", tmp_path / "mnt", "--log-file", log) as mnt:
            wrong = []

            def reader(k):
                for j in range(4):
                    name = f"f{(k + j) % 4}"
                    with open(mnt / name, "rb") as f:
                        if hashlib.file_digest(f, "sha256").hexdigest() != want[name]:
                            wrong.append(name)
            for _ in range(3):
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
                threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
                [t.start() for t in threads]
                [t.join() for t in threads]
            assert wrong == []
            from lazyfs.fs import control
            s = control.query(str(mnt))["cache"]
            assert s["disk_write_errors"] > 0 and 0 < s["memory_bytes"] <= MEMORY_FALLBACK
        errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "cannot write blocks" in errors[0], errors[:3]
    finally:
        subprocess.run(["umount", "-l", str(cache)], capture_output=True)


def test_the_mount_table_reads_any_path_the_kernel_escapes(tmp_path):
    """/proc/self/mountinfo escapes a space, a tab, a newline and a backslash as octal, and
    passes other bytes through raw (UTF-8 or not): each comes back as the path os functions
    take, so a mount at such a path is found (and not taken for unmounted)."""
    from lazyfs.fs.mounts import mount_entry, mount_table
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xc3\xa9 a\tb\\c\nd \xff")
    os.mkdir(odd)
    subprocess.run(["mount", "-t", "tmpfs", "lazyfs-test", odd], check=True)
    try:
        assert mount_entry(odd) == {"fstype": "tmpfs", "source": "lazyfs-test"}
        assert [m.point for m in mount_table() if m.source == "lazyfs-test"] == [odd]
    finally:
        subprocess.run(["umount", odd], check=True)
    assert mount_entry(odd) is None

"""Process snapshots end to end: a real Debian image with Python and NumPy, real CRIU, a real
FUSE mount. Snapshot once, restore twice; shared blocks; corrupt blocks; the wrong image.

Runs and restores go the way a node runs them: forked by the node agent, a restore on the
agent's shared mount of the image (``through_the_agent``); a few go without the agent too."""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lazyfs.format import block
from lazyfs.format import snapshot as snapfmt
from lazyfs.cache import layout
from lazyfs.records import objects
from lazyfs.store.local import LocalStore
from lazyfs.format import profile as proffmt
from snapshot import criu, lazyserver, procs
from snapshot.criuimg import parse_pagemap
from snapshot.workspace import MOUNT_BASE
from tests.conftest import lazyfs_cli, lazyfs_mounts, mount_skip_reason

PROGRAM = r'''
import hashlib, os, random, socket, ssl, sys
import numpy as np
import lazyfs_snapshot as snapshot
ssl.RAND_bytes(16)  # OpenSSL's generator seeded before the snapshot (as by a TLS download)
counter = 0
big = bytearray(random.Random(42).randbytes(48 * 1024 * 1024))  # 48 MiB, like weights
arr = np.arange(2_000_000, dtype=np.float64) * float(sys.argv[1])
state = open("/tmp/state.txt", "w")                       # an open file, mid-way
for _ in range(5):
    counter += 1
    state.write(f"tick {counter}\n")
state.flush()
print("warm", counter, flush=True)
print("network", *sorted(name for _, name in socket.if_nameindex()), flush=True)
generation = snapshot.ready()
counter += 1
state.write(f"after {counter}\n")
state.flush()
print("continued", generation, counter, len(big), float(arr.sum()), flush=True)
print("digest", hashlib.sha256(big).hexdigest(), flush=True)  # every byte of the 48 MiB, read back
print("random", random.random(), float(np.random.rand()), ssl.RAND_bytes(16).hex(), flush=True)
print("state", open("/tmp/state.txt").read().replace("\n", "|"), flush=True)
print("network", *sorted(name for _, name in socket.if_nameindex()), flush=True)
sys.exit(7)
'''


FORK_PROGRAM = r'''
import hashlib, os, random
import lazyfs_snapshot as snapshot
big = bytearray(random.Random(1).randbytes(24 * 1024 * 1024))
r, w = os.pipe()
child = os.fork()
if child == 0:  # a worker forked before the snapshot, with memory of its own
    mine = bytearray(random.Random(2).randbytes(8 * 1024 * 1024))
    os.close(w)
    os.read(r, 1)  # runs on once the parent, restored, says so
    print("worker", hashlib.sha256(big).hexdigest(), hashlib.sha256(mine).hexdigest(), flush=True)
    os._exit(0)
os.close(r)
snapshot.ready()
os.write(w, b"x")
os.waitpid(child, 0)
late = os.fork()  # forked after the restore, before all the memory is in
if late == 0:
    print("late", hashlib.sha256(big).hexdigest(), flush=True)
    os._exit(0)
os.waitpid(late, 0)
print("parent", hashlib.sha256(big).hexdigest(), flush=True)
'''
MAP_PROGRAM = r'''
import mmap, os, shutil
import lazyfs_snapshot as snapshot
with open("/tmp/mapped.bin", "wb") as f:  # a file of the writable layer...
    f.write(b"before" + bytes(4090))
f = open("/tmp/mapped.bin", "r+b")
m = mmap.mmap(f.fileno(), 4096)  # ...mapped shared and writable across the snapshot
os.remove("/app/slow.py")  # an image file deleted (a whiteout)
shutil.rmtree("/etc/apt")  # an image directory replaced (an opaque directory)
os.mkdir("/etc/apt")
open("/etc/apt/new", "w").write("new")
snapshot.ready()
m[:5] = b"after"
m.flush()
print("mapped", open("/tmp/mapped.bin", "rb").read(6).decode(), flush=True)
print("deleted", os.path.exists("/app/slow.py"), flush=True)
print("replaced", *sorted(os.listdir("/etc/apt")), flush=True)
'''
SLOW_PROGRAM = r'''
import time
import lazyfs_snapshot as snapshot
memory = bytearray(range(256)) * (64 * 1024)  # 16 MiB to serve lazily
snapshot.ready()
print("continued", len(memory), flush=True)
time.sleep(120)  # still running when the restore is interrupted
'''
END_PROGRAM = r'''
import os, random, time
import lazyfs_snapshot as snapshot
big = bytearray(random.Random(42).randbytes(48 * 1024 * 1024))  # never read after the restore
snapshot.ready()
print("continued", flush=True)
time.sleep(2)  # quiet: the page server brings the rest of the memory in meanwhile
print("ended", flush=True)
os._exit(137)  # as if SIGKILLed, which it was not (and its memory still mapped: a SystemExit
               # would unmap what the page server still brings)
'''
WIPE_PROGRAM = r'''
import ctypes, mmap, os, signal
import lazyfs_snapshot as snapshot
madvise = ctypes.CDLL(None, use_errno=True).madvise
madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
SIZE = 8 << 20

def wiped_on_fork(fill):  # as glibc's getrandom, BoringSSL and AWS-LC keep their generators
    m = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    at = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert madvise(at, SIZE, 18) == 0, ctypes.get_errno()  # MADV_WIPEONFORK
    m[:] = fill * SIZE
    return m, at

def ends(m):
    return (m[:2] + m[-2:]).hex()

def flagged(at):
    lines = open("/proc/self/smaps").read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{at:x}-"))
    return "wf" in next(line for line in lines[start:] if line.startswith("VmFlags")).split()

def in_a_child(m):
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(w, ends(m).encode())
        os._exit(0)
    os.waitpid(child, 0)
    return os.read(r, 8).decode()

mine, at = wiped_on_fork(b"\x5a")
kept = bytearray(b"\x33" * 4096)  # ordinary memory: kept as it is
go, asked = os.pipe()
answer, told = os.pipe()
worker = os.fork()
if worker == 0:  # a process of the tree that does not call ready()
    theirs, _ = wiped_on_fork(b"\x77")
    os.write(told, b"1")
    os.read(go, 1)
    restored = ends(theirs)
    theirs[:] = b"\x22" * SIZE  # a child it forks now, too, must not see what it wrote
    os.write(told, (restored + in_a_child(theirs)).encode())
    os._exit(0)
os.read(answer, 1)
halted = os.fork()
if halted == 0:  # stopped by a signal when the tree is dumped: it stays stopped in every copy
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)
os.waitpid(halted, os.WUNTRACED)

def state(pid):
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]

print("before", ends(mine), flagged(at), in_a_child(mine), flush=True)
snapshot.ready()
print("proc", os.getpid(), os.readlink("/proc/self"), *sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
      flush=True)  # the tree's own, as in the snapshot run: not the host's processes
print("halted", state(halted), flush=True)
os.kill(halted, signal.SIGCONT)
os.waitpid(halted, 0)
os.write(asked, b"1")
told_back = os.read(answer, 16).decode()  # (written at once: a pipe delivers it whole)
print("worker", told_back[:8], told_back[8:], flush=True)
restored = ends(mine)
mine[:] = b"\x11" * SIZE  # written after the restore: a child forked now must not see it
print("after", restored, flagged(at), ends(mine), in_a_child(mine), kept[:2].hex(), flush=True)
os.waitpid(worker, 0)
'''
URANDOM_PROGRAM = r'''
import os
import lazyfs_snapshot as snapshot
os.urandom(16)
snapshot.ready()
print("urandom", os.urandom(16).hex(), flush=True)
'''
BIG_DIGEST = hashlib.sha256(random.Random(42).randbytes(48 * 1024 * 1024)).hexdigest()


def _skip_reason() -> str | None:
    return mount_skip_reason() or criu.skip_reason() or (
        None if shutil.which("debootstrap") else "debootstrap is not installed")


pytestmark = [pytest.mark.mount,
              pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


@pytest.fixture(autouse=True)
def through_the_agent(node_agent):
    return node_agent


_OTHERS: set[int] = set()  # page servers that were running when the test began: not the test's


@pytest.fixture(autouse=True)
def others_page_servers():
    """Another restore's page server on this machine (a bench, a user) is neither what a test
    looks for nor what it may kill."""
    _OTHERS.clear()
    _OTHERS.update(_page_servers())
    yield
    _OTHERS.clear()


def _without_the_agent(monkeypatch) -> None:
    monkeypatch.setenv("LAZYFS_NODE", "off")


@pytest.fixture(scope="session")
def numpy_rootfs(tmp_path_factory):
    """Debian bookworm minbase + python3 + python3-numpy, from the configured package mirror."""
    root = tmp_path_factory.mktemp("numpy") / "rootfs"
    proc = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-numpy",
                           "bookworm", str(root)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"debootstrap of a python3+numpy image failed: {proc.stdout[-500:]}{proc.stderr[-500:]}")
    (root / "app").mkdir()
    (root / "app" / "prog.py").write_text(PROGRAM)
    (root / "app" / "fork.py").write_text(FORK_PROGRAM)
    (root / "app" / "slow.py").write_text(SLOW_PROGRAM)
    (root / "app" / "map.py").write_text(MAP_PROGRAM)
    (root / "app" / "end.py").write_text(END_PROGRAM)
    (root / "app" / "wipe.py").write_text(WIPE_PROGRAM)
    return root


@pytest.fixture(scope="session")
def numpy_store(numpy_rootfs, tmp_path_factory):
    """The image built once (`lazyfs build`, ~7 s); each test gets a copy of this store."""
    store = tmp_path_factory.mktemp("numpy-store") / "store"
    lazyfs_cli("build", f"dir:{numpy_rootfs}", "--tag", "snap/py:1", timeout=600,
               env={"LAZYFS_STORE": str(store), "LAZYFS_NODE": "off"})
    return store


@pytest.fixture(scope="session")
def trixie_store(tmp_path_factory):
    """Debian trixie minbase + python3: glibc 2.41, whose getrandom() (so Python's os.urandom)
    runs the kernel's vDSO generator, its state in wipe-on-fork memory."""
    root = tmp_path_factory.mktemp("trixie") / "rootfs"
    proc = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3", "trixie", str(root)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"debootstrap of Debian trixie failed: {proc.stdout[-500:]}{proc.stderr[-500:]}")
    (root / "app").mkdir()
    (root / "app" / "urandom.py").write_text(URANDOM_PROGRAM)
    store = tmp_path_factory.mktemp("trixie-store") / "store"
    lazyfs_cli("build", f"dir:{root}", "--tag", "snap/trixie:1", timeout=600,
               env={"LAZYFS_STORE": str(store), "LAZYFS_NODE": "off"})
    return store


@pytest.fixture
def image(numpy_store, env_dirs):
    """A store of the test's own holding the built image: a copy, not links, since some tests
    rot blocks in place."""
    subprocess.run(["cp", "-a", f"{numpy_store}/.", env_dirs["LAZYFS_STORE"]], check=True)
    return LocalStore(env_dirs["LAZYFS_STORE"])


def _snapshot(name: str, scale: str = "1"):
    proc = lazyfs_cli("run", "--snapshot", name, "snap/py:1", "--", "python3", "/app/prog.py",
                      scale, timeout=300)
    assert "warm 5" in proc.stdout
    assert "continued" not in proc.stdout  # the original was dumped (and stopped) at ready()
    assert _lines(proc.stdout)["network"] == ["lo"]  # --network none, as a plain run has it
    return proc


def _lines(stdout: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.strip()}


@pytest.mark.parametrize("agent", ["agent", "no agent"])
def test_snapshot_then_restore_twice_continues_with_fresh_randomness(image, agent, monkeypatch, tmp_path):
    if agent == "no agent":
        _without_the_agent(monkeypatch)
    # A node whose iptables does not work: a tree with a network of its own is not locked.
    broken = tmp_path / "no-iptables"
    broken.mkdir()
    for name in ("iptables-restore", "ip6tables-restore"):
        (broken / name).symlink_to(shutil.which("false"))
    monkeypatch.setenv("PATH", f"{broken}:{os.environ['PATH']}")
    _snapshot("warm/py:1")
    # The float64 array's memory is stored byte-shuffled, the random bytearray's as it is.
    frames = [image.get_block(d) for f in _manifest(image, "warm/py:1").files
              if f.name.startswith("criu/pages-") for d, _ in f.chunks]
    shuffled = sum(fr.startswith(block.SHUFFLED) for fr in frames)
    assert 0 < shuffled < len(frames)
    runs = [lazyfs_cli("run", "-v", "--restore", "warm/py:1", "snap/py:1", check=False, timeout=300)
            for _ in range(2)]
    # The first restore records the working set, on a traced mount of its own; the second
    # restores on the node agent's shared mount of the image, where there is an agent.
    assert "took the node agent's mount" not in runs[0].stderr
    assert ("took the node agent's mount of the image" in runs[1].stderr) == (agent == "agent"), runs[1].stderr
    outs = []
    for r in runs:
        assert r.returncode == 7, r.stderr  # the program's own exit code, after the restore
        assert "warning" not in r.stderr
        out = _lines(r.stdout)
        assert "warm" not in out  # output before the snapshot is not replayed
        generation, counter, big, total = out["continued"]
        assert counter == "6" and big == str(48 * 1024 * 1024)
        assert float(total) == sum(range(2_000_000))
        assert out["digest"] == [BIG_DIGEST]
        assert " ".join(out["state"]) == "tick 1|tick 2|tick 3|tick 4|tick 5|after 6|"
        assert out["network"] == ["lo"]  # a network of its own again, not the host's
        outs.append((generation, out["random"]))
    assert outs[0][0] != outs[1][0]  # each restored copy has its own identity
    assert all(a != b for a, b in zip(outs[0][1], outs[1][1])) and len(outs[0][1]) == 3  # and its own RNGs
    # The writable layer (the open /tmp/state.txt above) came as an EROFS image, mounted below a
    # new writable layer: the restored process wrote on through a copy-up of it.
    names = {f.name for f in _manifest(image, "warm/py:1").files}
    assert "upper.erofs" in names and "upper.tar" not in names


def test_a_snapshot_on_the_hosts_network_comes_back_on_it(image):
    import socket
    host = sorted(name for _, name in socket.if_nameindex())
    proc = lazyfs_cli("run", "--snapshot", "warm/host:1", "--network", "host", "snap/py:1", "--",
                      "python3", "/app/prog.py", "1", timeout=300)
    assert _lines(proc.stdout)["network"] == host
    r = lazyfs_cli("run", "--restore", "warm/host:1", "snap/py:1", check=False, timeout=300)
    assert r.returncode == 7 and "warning" not in r.stderr, r.stderr
    assert _lines(r.stdout)["network"] == host


def _manifest(image, ref: str) -> snapfmt.Snapshot:
    name, _, tag = ref.partition(":")
    return snapfmt.decode(objects.read_manifest_bytes(image, image.get_tag(name, tag)))


def test_the_writable_layer_comes_back_below_a_new_one_with_its_deletions_and_mapped_files(image):
    """The writable layer comes back as a read-only layer below a new one: CRIU reopens a file
    mapped shared and writable through the overlay, which copies it up, and the mapping writes
    into it; files and directories the process deleted or replaced stay so."""
    lazyfs_cli("run", "--snapshot", "map/py:1", "snap/py:1", "--", "python3", "/app/map.py", timeout=300)
    assert "upper.erofs" in {f.name for f in _manifest(image, "map/py:1").files}
    r = lazyfs_cli("run", "--restore", "map/py:1", "snap/py:1", check=False, timeout=300)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    out = _lines(r.stdout)
    assert out["mapped"] == ["aftere"]  # written through the mapping, read back
    assert out["deleted"] == ["False"] and out["replaced"] == ["new"]  # whiteout, opaque directory


def test_a_node_without_erofs_utils_carries_the_writable_layer_as_a_tar(image, tmp_path):
    """No mkfs.erofs on the snapshotting machine (and snapshots made before): the writable layer
    travels as a tar, unpacked into the new writable layer, and the state comes back exact."""
    bin_dir = tmp_path / "bin"  # this machine's PATH, less mkfs.erofs
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        for exe in (Path(d).iterdir() if Path(d).is_dir() else ()):
            if exe.name != "mkfs.erofs" and not (bin_dir / exe.name).exists():
                (bin_dir / exe.name).symlink_to(exe)
    env = {**os.environ, "PATH": str(bin_dir), "LAZYFS_NODE": "off"}
    proc = lazyfs_cli("run", "--snapshot", "tar/py:1", "snap/py:1", "--", "python3", "/app/prog.py",
                      "1", timeout=300, env=env)
    assert "warm 5" in proc.stdout
    names = {f.name for f in _manifest(image, "tar/py:1").files}
    assert "upper.tar" in names and "upper.erofs" not in names
    r = lazyfs_cli("run", "--restore", "tar/py:1", "snap/py:1", check=False, timeout=300)
    assert r.returncode == 7 and "warning" not in r.stderr, r.stderr
    out = _lines(r.stdout)
    assert out["continued"][1] == "6" and out["digest"] == [BIG_DIGEST]
    assert " ".join(out["state"]) == "tick 1|tick 2|tick 3|tick 4|tick 5|after 6|"


def test_two_snapshots_of_one_image_share_blocks(image):
    _snapshot("warm/py:a", "1")
    _snapshot("warm/py:b", "2")
    a = snapfmt.decode(objects.read_manifest_bytes(image, image.get_tag("warm/py", "a")))
    b = snapfmt.decode(objects.read_manifest_bytes(image, image.get_tag("warm/py", "b")))
    shared = a.blocks() & b.blocks()
    assert len(shared) >= 0.5 * len(b.blocks()), (len(shared), len(b.blocks()))
    assert a.image == b.image == image.get_tag("snap/py", "1")
    listed = lazyfs_cli("snapshots", "--json").stdout
    assert "warm/py:a" in listed and "warm/py:b" in listed
    gc = lazyfs_cli("gc", "--dry-run", "--grace", "0", "--json").stdout
    assert '"swept_blocks": 0' in gc  # snapshot blocks and the pinned image are live


def test_corrupt_snapshot_block_falls_back_to_a_cold_start(image):
    _snapshot("warm/py:1")
    snap = snapfmt.decode(objects.read_manifest_bytes(image, image.get_tag("warm/py", "1")))
    victim, size = next(f for f in snap.files if f.name.startswith("criu/pages")).chunks[0]
    # A well-formed frame of the right size holding other bytes: only the digest can tell.
    image._block_path(victim).write_bytes(block.encode(b"\0" * size)[1])
    r = lazyfs_cli("run", "--restore", "warm/py:1", "snap/py:1", check=False, timeout=300)
    assert "restore of snapshot warm/py:1 failed" in r.stderr
    assert victim in r.stderr and "hashes to" in r.stderr
    assert "starting snap/py:1 cold instead" in r.stderr
    out = _lines(r.stdout)
    assert out["warm"] == ["5"] and out["continued"][:2] == ["0", "6"]  # ran from the start
    assert r.returncode == 7


def test_a_restore_that_cannot_make_its_workspace_starts_cold(image, monkeypatch):
    """/run full or read-only: the restore cannot lay out its workspace, and starts cold."""
    _without_the_agent(monkeypatch)  # (the restore runs in the mount namespace made here)
    _snapshot("warm/py:1")
    readonly_run = 'mkdir -p "$0" && mount -t tmpfs -o ro,size=64k lazyfs-test "$0" && exec "$@"'
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", readonly_run,
                        str(MOUNT_BASE), sys.executable, "-m", "lazyfs.cli", "run", "--restore",
                        "warm/py:1", "snap/py:1"], capture_output=True, text=True, timeout=300)
    assert "restore of snapshot warm/py:1 failed" in r.stderr, r.stderr
    assert "Read-only file system" in r.stderr, r.stderr
    assert "starting snap/py:1 cold instead" in r.stderr
    out = _lines(r.stdout)
    assert out.get("warm") == ["5"] and out["continued"][:2] == ["0", "6"], (r.stdout, r.stderr)
    assert r.returncode == 7


def test_a_fetch_that_fails_once_the_restored_program_has_ended_does_not_run_it_again(image):
    """The page server's last fetch fails only after the program ended on its own: its run and
    exit status stand (a warning says what failed); it is not started again cold, as if it had
    been killed, also when its exit status reads as a SIGKILL's (137)."""
    lazyfs_cli("run", "--snapshot", "warm/end:1", "snap/py:1", "--", "python3", "/app/end.py", timeout=300)
    snap = snapfmt.decode(objects.read_manifest_bytes(image, image.get_tag("warm/end", "1")))
    victim = _lazy_big_block(image, snap)
    path = image._block_path(victim)
    path.unlink()
    os.mkfifo(path)  # the page server's read of it waits until this test answers, with garbage
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs", "run", "--restore", "warm/end:1", "snap/py:1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        fifo = None
        deadline = time.monotonic() + 60
        while fifo is None and time.monotonic() < deadline:  # until the page server reads it
            try:
                fifo = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader yet
                time.sleep(0.01)
        lines = [proc.stdout.readline().split()[0], proc.stdout.readline().split()[0]]
        assert lines == ["continued", "ended"], lines
        if fifo is not None:
            time.sleep(0.3)  # the program has exited: now the read fails
            os.write(fifo, b"not a block")
            os.close(fifo)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert fifo is not None, "the page server never read the block"
    assert proc.returncode == 137, err
    assert "cold instead" not in err and "continued" not in out, (out, err)
    # (a block fetched ahead: left missing, and said; one a fault waited on would have killed it)
    assert "after the restored process ended" in err and "could not be fetched" in err, err
    assert victim in err


def _lazy_big_block(image, snap) -> str:
    """A block of the pages file that lies wholly inside the 48 MiB bytearray's memory (the one
    lazy extent of that size), which the program reads only after the restore."""
    def file_bytes(name):
        f = next(f for f in snap.files if f.name == name)
        return b"".join(objects.fetch_block(image, d, n) for d, n in f.chunks)
    pm = parse_pagemap(file_bytes("criu/pagemap-1.img"))
    runs: list[list[int]] = []  # [offset, end] of lazy memory contiguous in both address and file
    for e in pm.extents:
        if e.lazy and runs and runs[-1][2] == e.vaddr and runs[-1][1] == e.offset:
            runs[-1][1:] = [e.offset + e.pages * 4096, e.end]
        elif e.lazy:
            runs.append([e.offset, e.offset + e.pages * 4096, e.end])
    start, end, _ = max(runs, key=lambda r: r[1] - r[0])
    assert end - start >= 48 * 1024 * 1024
    pages = next(f for f in snap.files if f.name == f"criu/{pm.pages_file}")
    off = 0
    for digest, n in pages.chunks:
        if off >= (start + end) // 2 and off + n <= end:
            return digest
        off += n
    raise AssertionError("no block inside the bytearray")


def _stat(stderr: str, pattern: str) -> float:
    m = re.search(pattern, stderr)
    assert m, stderr
    return float(m.group(1))


def test_lazy_restore_fetches_little_records_its_working_set_and_prefetches_it(image):
    _snapshot("warm/py:1")
    snap_digest = image.get_tag("warm/py", "1")
    snap = snapfmt.decode(objects.read_manifest_bytes(image, snap_digest))
    total = sum(f.size for f in snap.files)
    runs = []
    for mode in ("--lazy", "--lazy", "--eager"):
        r = lazyfs_cli("run", "-v", mode, "--restore", "warm/py:1", "snap/py:1", check=False, timeout=300)
        assert r.returncode == 7 and "warning" not in r.stderr, r.stderr
        out = _lines(r.stdout)
        assert out["continued"][1] == "6" and out["digest"] == [BIG_DIGEST]
        runs.append(r.stderr)
    first, second, eager = runs
    # Lazy: before CRIU starts, only the small images and the pages CRIU maps itself.
    assert _stat(first, r"fetched (\d+) bytes") < 0.25 * total
    assert _stat(eager, r"fetched (\d+) bytes") == total
    recorded = _stat(first, r"recorded a working set of (\d+) blocks")
    ws = proffmt.decode(objects.read_manifest_bytes(image, image.get_tag(*proffmt.tag_for(snap_digest))))
    assert len(ws.blocks) == recorded > 0 and ws.image == snap_digest
    # Memory blocks the page server served, and image blocks the restored process read.
    assert ws.meta["page_blocks"] > 0 and ws.meta["image_blocks"] > 0
    assert ws.meta["page_blocks"] + ws.meta["image_blocks"] == recorded
    # The second restore prefetches those blocks, so the process faults on far fewer pages.
    assert _stat(second, r"of (\d+) blocks prefetched") == ws.meta["page_blocks"]
    assert "recorded a working set" not in second
    assert _stat(second, r"lazy restore: (\d+) faults") < _stat(first, r"lazy restore: (\d+) faults")


def test_lazy_restore_with_a_corrupt_memory_block_is_killed_and_starts_cold(image):
    """The bad block is fetched only when the restored process reads that memory: the page
    server must kill the process (never hand it other bytes or zeroes) and lazyfs starts cold."""
    _snapshot("warm/py:1")
    snap = snapfmt.decode(objects.read_manifest_bytes(image, image.get_tag("warm/py", "1")))
    victim = _lazy_big_block(image, snap)
    size = next(n for f in snap.files for d, n in f.chunks if d == victim)
    image._block_path(victim).write_bytes(block.encode(b"\0" * size)[1])
    r = lazyfs_cli("run", "--restore", "warm/py:1", "snap/py:1", check=False, timeout=300)
    assert "the restored process was killed" in r.stderr and victim in r.stderr, r.stderr
    assert "starting snap/py:1 cold instead" in r.stderr
    digests = [line for line in r.stdout.splitlines() if line.startswith("digest")]
    assert digests == [f"digest {BIG_DIGEST}"]  # only the cold run got that far
    assert _lines(r.stdout)["warm"] == ["5"] and r.returncode == 7


def test_lazy_restore_of_a_process_tree_and_a_fork_after_it(image):
    """Two processes in the snapshot (each its own userfaultfd and pages) and a third forked
    after the restore (userfaultfd's fork event): every byte right, with and without the
    working set the first restore recorded."""
    lazyfs_cli("run", "--snapshot", "warm/fork:1", "snap/py:1", "--", "python3", "/app/fork.py", timeout=300)
    big = hashlib.sha256(random.Random(1).randbytes(24 * 1024 * 1024)).hexdigest()
    mine = hashlib.sha256(random.Random(2).randbytes(8 * 1024 * 1024)).hexdigest()
    for _ in range(2):
        r = lazyfs_cli("run", "-v", "--restore", "warm/fork:1", "snap/py:1", check=False, timeout=300)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
        assert _lines(r.stdout) == {"worker": [big, mine], "late": [big], "parent": [big]}
    assert "recorded a working set" not in r.stderr and _stat(r.stderr, r"of (\d+) blocks prefetched") > 0


def test_memory_a_fork_wipes_is_wiped_in_every_restored_copy(image):
    """Memory marked MADV_WIPEONFORK, where random number generators keep state that must not
    be shared, comes back zeroed in each process of the tree, as in a fork's child, and marked
    again in the process that called ready(), and at the first fork of another; other memory
    comes back as it was, /proc shows the tree's own processes, and a process a signal had
    stopped is still stopped."""
    r = lazyfs_cli("run", "--snapshot", "warm/wipe:1", "snap/py:1", "--", "python3", "/app/wipe.py",
                   timeout=300)
    assert _lines(r.stdout)["before"] == ["5a5a5a5a", "True", "00000000"]
    for how in ("--no-working-set", "--eager", "--restore"):  # lazy, eager, lazy with the working set
        args = ["--restore"] if how == "--restore" else [how, "--restore"]
        r = lazyfs_cli("run", "-v", *args, "warm/wipe:1", "snap/py:1", check=False, timeout=300)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stdout + r.stderr
        out = _lines(r.stdout)
        assert out["proc"] == ["1", "1", "1", "2", "3"], how
        assert out["halted"] == ["T"], how
        assert out["worker"] == ["00000000", "00000000"], how
        assert out["after"] == ["00000000", "True", "11111111", "00000000", "3333"], how


def test_restored_copies_on_a_newer_glibc_draw_their_own_os_urandom(trixie_store, env_dirs):
    """On glibc 2.41, os.urandom() is the vDSO's generator, keyed from state in wipe-on-fork
    memory for as long as the kernel's generation (about a minute) lasts. Restored right after the
    snapshot, every copy drew the same bytes until a restore wiped that memory."""
    subprocess.run(["cp", "-a", f"{trixie_store}/.", env_dirs["LAZYFS_STORE"]], check=True)
    lazyfs_cli("run", "--snapshot", "warm/urandom:1", "snap/trixie:1", "--", "python3",
               "/app/urandom.py", timeout=300)
    store = LocalStore(env_dirs["LAZYFS_STORE"])
    if not snapfmt.wipe_on_fork(_manifest(store, "warm/urandom:1").meta):
        pytest.skip("this kernel has no vDSO getrandom: glibc keeps no generator state in "
                    "wipe-on-fork memory here")
    drawn = []
    for args in (["--restore"], ["--eager", "--restore"], ["--restore"]):
        r = lazyfs_cli("run", *args, "warm/urandom:1", "snap/trixie:1", check=False, timeout=300)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stdout + r.stderr
        drawn += _lines(r.stdout)["urandom"]
    assert len(set(drawn)) == 3, drawn


SHM_PROGRAM = r'''
import os
from multiprocessing import shared_memory
import lazyfs_snapshot as snapshot
kept = shared_memory.SharedMemory(create=True, size=1 << 20, name="weights")  # kept by name, mapped
kept.buf[:4] = b"warm"
with open("/dev/shm/notes", "w") as f:
    f.write("written before")
snapshot.ready()
print("shm", bytes(kept.buf[:4]).decode(), open("/dev/shm/notes").read().replace(" ", "-"),
      *sorted(os.listdir("/dev/shm")), flush=True)
kept.buf[:4] = b"more"  # still the file's memory: what another process opening it reads
other = shared_memory.SharedMemory(name="weights")
print("again", bytes(other.buf[:4]).decode(), flush=True)
other.close()
kept.close()
kept.unlink()
'''


def test_what_the_program_keeps_in_dev_shm_comes_back_with_it(image):
    """POSIX shared memory kept by name lives in the container's /dev/shm, a tmpfs outside the
    writable layer, and CRIU reopens it by path: without it every restore fell back cold."""
    lazyfs_cli("run", "--snapshot", "warm/shm:1", "snap/py:1", "--", "python3", "-c", SHM_PROGRAM,
               timeout=300)
    for args in (["--restore"], ["--eager", "--restore"]):
        r = lazyfs_cli("run", *args, "warm/shm:1", "snap/py:1", check=False, timeout=300)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stdout + r.stderr
        out = _lines(r.stdout)
        assert out["shm"] == ["warm", "written-before", "notes", "weights"], args
        assert out["again"] == ["more"], args


LINKS_PROGRAM = r'''
import os, sys
import lazyfs_snapshot as snapshot
for name in ("restored.tmp", "wipe-on-fork.tmp"):  # links into the host, for a restore to follow
    os.symlink(sys.argv[1] + "-" + name, "/.lazyfs/" + name)
notes = open("/tmp/notes", "w")
notes.write("before ")
print("who", os.getuid(), os.getgid(), flush=True)
snapshot.ready()
notes.write("after")
notes.flush()
print("restored", os.getuid(), os.getgid(), open("/tmp/notes").read().replace(" ", "-"),
      os.readlink("/proc/self"), flush=True)
'''


def _has_cap(bit: int) -> bool:
    with open("/proc/self/status") as f:
        return bool(int(f.read().split("CapEff:")[1].split()[0], 16) >> bit & 1)


def test_links_left_in_the_marker_directory_never_lead_a_restore_out_of_the_container(image, tmp_path):
    """The program may write in its marker directory (it writes `ready` there, as whatever user
    it runs as), so a restore, which writes its markers there as root from outside the
    container, follows no link it finds: one would point into the host."""
    planted = tmp_path / "planted"
    lazyfs_cli("run", "--snapshot", "warm/links:1", "snap/py:1", "--", "python3", "-c", LINKS_PROGRAM,
               str(planted), timeout=300)
    for args in (["--restore"], ["--eager", "--restore"]):
        r = lazyfs_cli("run", *args, "warm/links:1", "snap/py:1", check=False, timeout=300)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stdout + r.stderr
        assert _lines(r.stdout)["restored"] == ["0", "0", "before-after", "1"], args
    assert not list(tmp_path.glob("planted*"))


def test_a_program_run_as_another_user_is_snapshotted_and_restored(image, tmp_path):
    """Not root, ready() still signals: the marker directory is open to the program's user."""
    r = lazyfs_cli("run", "--user", "65534:65534", "--snapshot", "warm/user:1", "snap/py:1", "--",
                   "python3", "-c", LINKS_PROGRAM, str(tmp_path / "planted"), check=False, timeout=300)
    assert _lines(r.stdout)["who"] == ["65534", "65534"]
    if not _has_cap(24):  # CAP_SYS_RESOURCE
        assert "criu dump of pid" in r.stderr and "Can't get rlimit" in r.stderr, r.stdout + r.stderr
        pytest.skip("criu reads another user's process's rlimits only with CAP_SYS_RESOURCE, which "
                    "root lacks here: ready() signalled, and the dump failed on that")
    assert r.returncode == 0, r.stdout + r.stderr
    for args in (["--restore"], ["--eager", "--restore"]):
        r = lazyfs_cli("run", *args, "warm/user:1", "snap/py:1", check=False, timeout=300)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stdout + r.stderr
        assert _lines(r.stdout)["restored"] == ["65534", "65534", "before-after", "1"], args
    assert not list(tmp_path.glob("planted*"))


def test_snapshot_of_another_image_is_refused(image, numpy_rootfs, tmp_path):
    _snapshot("warm/py:1")
    other = tmp_path / "other"
    other.mkdir()
    (other / "marker").write_text("a different image\n")
    lazyfs_cli("build", f"dir:{other}", "--tag", "snap/other:1")
    r = lazyfs_cli("run", "--restore", "warm/py:1", "snap/other:1", check=False)
    assert r.returncode != 0
    assert re.search(r"was taken on image sha256:[0-9a-f]{64}, not on snap/other:1", r.stderr)
    assert "cold" not in r.stderr
    # The snapshot's tag given where the image's belongs: named for what it is.
    r = lazyfs_cli("run", "warm/py:1", "--", "true", check=False)
    assert r.returncode != 0 and "is a snapshot manifest, not an image's (restore it with" in r.stderr, r.stderr


def test_a_restore_whose_reader_goes_away_runs_its_program_once(image):
    """`lazyfs run --restore ... | head -1`: the output's reader exits after the first line, and
    the program's later lines have nowhere to go. The program still runs once, to its own end
    and exit code: no cold start of it a second time, no traceback."""
    _snapshot("warm/py:1")
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs", "run", "--restore", "warm/py:1", "snap/py:1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("continued")
        proc.stdout.close()  # (the digest line comes later: the 48 MiB are read back first)
        err = proc.stderr.read()
        assert proc.wait(120) == 7, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "cold instead" not in err and "Traceback" not in err, err


def test_ready_without_a_snapshot_run_is_a_no_op(image):
    """The same program runs cold: a plain `lazyfs run` has the helper, and ready() returns 0."""
    r = lazyfs_cli("run", "snap/py:1", "--", "python3", "/app/prog.py", "1", check=False, timeout=300)
    assert _lines(r.stdout)["continued"][:2] == ["0", "6"] and r.returncode == 7, r.stderr
    # And when a restore falls back to a cold start.
    r = lazyfs_cli("run", "--restore", "no/such:snap", "snap/py:1", "--", "python3", "/app/prog.py",
                   "1", check=False, timeout=300)
    assert "not found" in r.stderr and "cold instead" in r.stderr
    assert _lines(r.stdout)["continued"][:2] == ["0", "6"] and r.returncode == 7


def test_snapshot_and_restore_through_a_cache_server(image, env_dirs, tmp_path):
    from tests.conftest import TEST_TOKEN
    from bench.servers import CacheServer
    token = tmp_path / "token"
    token.write_text(TEST_TOKEN)
    server = CacheServer(env_dirs["LAZYFS_STORE"], tmp_path / "server-cache", token_file=token,
                         extra=("--no-access-log",)).start()
    try:
        env = {"LAZYFS_TOKEN_FILE": str(token), "LAZYFS_CACHE_DIR": str(tmp_path / "node-2"),
               "LAZYFS_STORE": str(tmp_path / "not-used")}
        lazyfs_cli("run", "--server", server.url, "--snapshot", "warm/py:srv", "snap/py:1", "--",
                   "python3", "/app/prog.py", "1", env=env, timeout=300)
        assert image.get_tag("warm/py", "srv")  # published through the server into its origin
        env["LAZYFS_CACHE_DIR"] = str(tmp_path / "node-3")  # another node, cold
        r = lazyfs_cli("run", "--server", server.url, "--restore", "warm/py:srv", "snap/py:1",
                       env=env, check=False, timeout=300)
        assert r.returncode == 7 and "warning" not in r.stderr, r.stderr
        assert _lines(r.stdout)["continued"][1] == "6"
        assert not (tmp_path / "not-used").exists()
        # A third node, cold: the working set the restore above recorded streams in batches.
        env["LAZYFS_CACHE_DIR"] = str(tmp_path / "node-4")
        batches = _served(server.url, "requests", BATCH_ROUTE)
        cold = lazyfs_cli("run", "-v", "--server", server.url, "--restore", "warm/py:srv", "snap/py:1",
                          env=env, check=False, timeout=300)
        assert cold.returncode == 7 and "warning" not in cold.stderr, cold.stderr
        assert _lines(cold.stdout)["continued"][1] == "6"
        streamed = re.search(r"of (\d+) blocks prefetched and (\d+) image blocks for the mount "
                             r"\((\d+) fetched in (\d+) batch requests\)", cold.stderr)
        assert streamed, cold.stderr
        planned, image_blocks, fetched, requests = map(int, streamed.groups())
        # The image's blocks of the working set come in the same stream as its memory, and
        # land in the node cache the mount reads (the mount prefetches none of them itself).
        from lazyfs.records import profiles
        ws = profiles.load(image, image.get_tag("warm/py", "srv"))
        assert image_blocks == ws.meta["image_blocks"] > 0
        memory = {b.digest for b in ws.blocks[:ws.meta["page_blocks"]]}
        landed = [b.digest for b in ws.blocks if b.digest not in memory
                  and os.path.exists(layout.block_path(tmp_path / "node-4", b.digest))]
        assert len(landed) == image_blocks
        # (the rest a fault asked for first, or the node had)
        assert 0 < requests < fetched <= planned + image_blocks
        assert _served(server.url, "requests", BATCH_ROUTE) >= batches + requests
        served = _block_bytes_served(server.url)
        again = lazyfs_cli("run", "--server", server.url, "--restore", "warm/py:srv", "snap/py:1",
                           env=env, check=False, timeout=300)
        assert again.returncode == 7 and _lines(again.stdout)["continued"][1] == "6"
        # The same node restores again from its node cache: (almost) no block bytes move.
        assert _block_bytes_served(server.url) - served < 0.05 * served
        # The server's copy of the working set's first memory block goes bad (after the server
        # verified it): the batch carrying it, and the retry, fail verification on the node; the
        # restored process is killed before it could see other bytes, and the command runs cold.
        snap_digest = image.get_tag("warm/py", "srv")
        snap = snapfmt.decode(objects.read_manifest_bytes(image, snap_digest))
        memory = {d: n for d, n in _lazy_blocks(image, snap)}  # (not one criu restore reads itself)
        victim = next(b.digest for b in profiles.load(image, snap_digest).blocks if b.digest in memory)
        bad = tmp_path / "server-cache" / "blocks" / victim[7:9] / victim[7:]
        assert bad.exists()  # (the restores above had the server fetch and verify it)
        # Bit rot: the same length, so the server sends it whole (a copy of another length it
        # would catch itself, ending its answer short: tests/test_cache_server.py).
        rotten = bytearray(bad.read_bytes())
        rotten[len(rotten) // 2] ^= 0xFF
        bad.write_bytes(bytes(rotten))
        env["LAZYFS_CACHE_DIR"] = str(tmp_path / "node-5")
        broken = lazyfs_cli("run", "--server", server.url, "--restore", "warm/py:srv", "snap/py:1",
                            env=env, check=False, timeout=300)
        assert "the restored process was killed" in broken.stderr and victim in broken.stderr, broken.stderr
        assert "cold instead" in broken.stderr
        assert _lines(broken.stdout)["continued"][:2] == ["0", "6"] and broken.returncode == 7
    finally:
        server.stop()


BATCH_ROUTE = "/v1/blocks/batch"


def _lazy_blocks(store, snap) -> list[tuple[str, int]]:
    """(digest, size) of the memory blocks only the page server serves: none of their pages is
    one criu restore reads itself (its pagemaps' eager ranges)."""
    eager: dict[str, list[tuple[int, int]]] = {}
    for f in snap.files:
        if f.name.startswith("criu/pagemap-"):
            pm = parse_pagemap(b"".join(block.decode(d, store.get_block(d)) for d, _ in f.chunks))
            eager.setdefault(f"criu/{pm.pages_file}", []).extend(pm.eager())
    out = []
    for f in snap.files:
        offset = 0
        for digest, size in f.chunks:
            if f.name in eager and not any(o < offset + size and offset < o + n for o, n in eager[f.name]):
                out.append((digest, size))
            offset += size
    return out


def _served(url: str, metric: str, route: str, code: str | None = None) -> float:
    import urllib.request
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(f"lazyfs_server_{metric}_total{{") and f'route="{route}"' in line
               and (code is None or f'code="{code}"' in line))


def _block_bytes_served(url: str) -> float:
    """Block bytes the server sent, one at a time or in batches."""
    return sum(_served(url, "response_bytes", r) for r in ("/v1/blocks/{digest}", BATCH_ROUTE))


def _snapshot_processes() -> list[int]:
    """Processes of the snapshotted program still alive on this machine, and what a criu restore
    of it left: criu itself, a task it was making (those carry criu's command line until
    they run the program), or a page server the test started (none outlives the restore it
    served)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat", "rb") as f:
                zombie = f.read().rpartition(b")")[2].split()[0] == b"Z"
        except OSError:
            continue
        page_server = _comm(pid) == lazyserver.NAME and int(pid) not in _OTHERS
        if not zombie and (b"/app/slow.py" in cmd or page_server
                           or (b"criu\0restore" in cmd and str(MOUNT_BASE).encode() in cmd)):
            found.append(int(pid))
    return found


def _criu_making_tree(restore: int | None = None) -> bool:
    """A task criu restore is making: criu's command line, in a PID namespace of its own.
    ``restore``: the restore's own process, whose child the tree's root is (``--restore-sibling``):
    only its children are looked at, a look short enough to catch an eager restore's few
    moments of it on a busy machine; else every process is."""
    if restore is not None:
        for pid in procs.in_other_ns(restore):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"criu\0restore" in f.read():
                        return True
            except OSError:
                continue
        return False
    for pid in _snapshot_processes():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                criu = b"/app/slow.py" not in f.read()
            nspid = next(line for line in open(f"/proc/{pid}/status") if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if criu and len(nspid.split()) > 2:
            return True
    return False


def _restore_mounts() -> list[str]:
    return lazyfs_mounts(MOUNT_BASE)


def _assert_the_restore_left_nothing(before: set, env_dirs, err: str, within: float) -> None:
    """No process of the snapshotted program, no workspace mount or directory (beyond
    ``before``), and the image unmounted by the agent once idle, within ``within`` seconds."""
    deadline = time.monotonic() + within
    while (_snapshot_processes() or set(_restore_mounts()) - before
           or lazyfs_mounts(env_dirs["LAZYFS_STATE_DIR"])) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _snapshot_processes() == [], err
    assert set(_restore_mounts()) - before == set(), err
    assert lazyfs_mounts(env_dirs["LAZYFS_STATE_DIR"]) == [], err  # the agent's idle unmount
    assert not [p for p in MOUNT_BASE.iterdir() if p.name.startswith("restore-")
                and str(p / "rootfs") not in before]


@pytest.mark.parametrize("when", ["starting", "criu restoring", "running"])
def test_a_restore_interrupted_halfway_leaves_no_mount_and_no_process(image, env_dirs, when):
    """Ctrl-C during a restore through the node agent (while it fetches and mounts, while criu
    restore makes the tree, or once the restored process runs): the restore stops, its process
    tree (also one criu had not finished) and workspace mounts go, and the agent, its lease
    given back, unmounts the image once idle."""
    before = set(_restore_mounts())  # (another session's, if any)
    lazyfs_cli("run", "--snapshot", "warm/slow:1", "snap/py:1", "--", "python3", "/app/slow.py",
               timeout=300)
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs", "run", "-v", "--no-working-set",
                             "--restore", "warm/slow:1", "snap/py:1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if when == "starting":
            time.sleep(0.3)
        elif when == "criu restoring":
            deadline = time.monotonic() + 60
            while not _criu_making_tree():
                assert time.monotonic() < deadline and proc.poll() is None, "criu restore never ran"
                time.sleep(0.002)
        else:
            assert proc.stdout.readline().startswith("continued"), proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, err
    _assert_the_restore_left_nothing(before, env_dirs, err, within=15)
    if when == "running":
        assert "took the node agent's mount of the image" in err


@pytest.mark.parametrize("how", ["SIGTERM", "its client killed", "SIGTERM, eager"])
def test_a_restore_stopped_by_a_kill_stops_its_process_and_leaves_nothing(image, env_dirs, how):
    """`kill PID` of a restore takes the Ctrl-C path (the restored tree asked to stop, then
    killed; the workspace and lease gone; no cold start), and so does a restore the agent forked
    whose client was killed with SIGKILL (the fork then stops itself as if sent SIGTERM). An
    eager restore's pages images are gone once criu has restored (in /run they are memory)."""
    before = set(_restore_mounts())
    lazyfs_cli("run", "--snapshot", "warm/slow:4", "snap/py:1", "--", "python3", "/app/slow.py",
               timeout=300)
    lazyfs_cli("run", "snap/py:1", "--", "true", timeout=300)  # (the agent is up: a restore next is its fork)
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs", "run", "--eager" if "eager" in how else
                             "--no-working-set", "--restore", "warm/slow:4", "snap/py:1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("continued")
        if "eager" in how:
            assert [p for p in MOUNT_BASE.glob("*/snap/criu/*") if p.name.startswith("pages-")] == []
            assert list(MOUNT_BASE.glob("*/snap/criu/pagemap-*.img"))  # (where they were)
        proc.send_signal(signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if how.startswith("SIGTERM"):
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "stopped by SIGTERM" in err and "cold" not in err, err
    _assert_the_restore_left_nothing(before, env_dirs, err, within=20)


def test_a_page_server_stopped_by_someone_elses_sigterm_takes_the_tree_it_serves_along(image, env_dirs):
    """A SIGTERM to the page server alone (`pkill -f "lazyfs run"` matches its command line
    too) while its tree still lacks memory: the tree is killed before the server lets go of its
    descriptors, never left to run on zero pages, and the restore ends as a stop would (no cold
    start). lazyfs run itself says it is done with the server otherwise (SIGUSR1)."""
    before = set(_restore_mounts())
    lazyfs_cli("run", "--snapshot", "warm/slow:5", "snap/py:1", "--", "python3", "/app/slow.py",
               timeout=300)
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs", "run", "--no-working-set", "--restore",
                             "warm/slow:5", "snap/py:1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("continued")  # (16 MiB still to come: faults first)
        [server] = set(_page_servers()) - _OTHERS
        os.kill(server, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "page server was stopped" in err and "cold" not in err, err
    _assert_the_restore_left_nothing(before, env_dirs, err, within=20)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_snapshot_run_killed_takes_its_program_along(image, env_dirs, sig):
    """A snapshot run killed before ready(): its program goes with it (nobody would ever stop
    it). SIGTERM takes the Ctrl-C path and leaves nothing; what SIGKILL left mounted, the next
    snapshot run removes."""
    def never_ready(daemon: bool = True) -> list[int]:
        """The program, its unshare and nsinit, and (``daemon``) the workspace's image mount
        daemon (a fork of the run: its command line too)."""
        return [int(p) for p in filter(str.isdigit, os.listdir("/proc"))
                if b"never ready" in _cmdline(p) and (daemon or _comm(p) != "lazyfs-mount")]

    before = set(_restore_mounts())
    prog = "import time; print('up', flush=True); time.sleep(120)  # never ready"
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs", "run", "--snapshot", "warm/never:1",
                             "snap/py:1", "--", "python3", "-c", prog],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        assert never_ready()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        deadline = time.monotonic() + 15
        while never_ready(daemon=sig == signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert never_ready(daemon=sig == signal.SIGTERM) == []
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + sig and "stopped by SIGTERM" in err, err
            assert set(_restore_mounts()) - before == set()
            return
        assert set(_restore_mounts()) - before  # the workspace's image mount and overlay
        r = lazyfs_cli("run", "--snapshot", "warm/slow:3", "snap/py:1", "--", "python3",
                       "/app/slow.py", timeout=300)
        assert "removed what a killed snapshot run or restore left" in r.stderr, r.stderr
        assert set(_restore_mounts()) - before == set()
        deadline = time.monotonic() + 15
        while never_ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert never_ready() == []  # the image's mount daemon went with its mount
    finally:
        for pid in never_ready():
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _page_servers() -> list[int]:
    return [int(p) for p in filter(str.isdigit, os.listdir("/proc")) if _comm(p) == lazyserver.NAME]


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


@pytest.mark.parametrize("agent", ["agent", "no agent"])
def test_what_a_restore_killed_with_sigkill_leaves_is_removed(image, env_dirs, agent, monkeypatch):
    """SIGKILL leaves a restore no teardown: its restored tree goes with it (the root keeps the
    parent-death signal of the snapshot run), its workspace's mounts stay. The node agent, whose
    lease on the image the restore held, sees it gone and removes them; without an agent, the
    next restore on the node does."""
    if agent == "no agent":
        _without_the_agent(monkeypatch)
    before = set(_restore_mounts())
    lazyfs_cli("run", "--snapshot", "warm/slow:2", "snap/py:1", "--", "python3", "/app/slow.py",
               timeout=300)
    restore = [sys.executable, "-m", "lazyfs", "run", "-v", "--no-working-set", "--restore",
               "warm/slow:2", "snap/py:1"]
    killed = subprocess.Popen(restore, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert killed.stdout.readline().startswith("continued")
        killed.kill()
        killed.communicate(timeout=60)
        deadline = time.monotonic() + 15
        while _snapshot_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _snapshot_processes() == []
        if agent == "agent":
            agent_log = Path(env_dirs["LAZYFS_STATE_DIR"]) / "node" / "agent.log"

            def swept() -> bool:  # (the agent says so once the workspace is gone, a moment after
                # its mounts: the line can come after the last of them)
                return "removed what a killed snapshot run or restore left" in \
                    agent_log.read_text(errors="replace")
            deadline = time.monotonic() + 30
            while (set(_restore_mounts()) - before or not swept()) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert set(_restore_mounts()) - before == set()
            assert swept(), agent_log.read_text(errors="replace")
            return
        left = set(_restore_mounts()) - before
        assert left  # (the overlay, and the bind of the image mount)
        _the_next_restore_removes_what_was_left(restore, left)
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait()
    deadline = time.monotonic() + 15
    while set(_restore_mounts()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(_restore_mounts()) - before == set()
    assert not [p for p in MOUNT_BASE.iterdir() if p.name.startswith("restore-")
                and str(p / "rootfs") not in before]


@pytest.mark.parametrize("via", ["store", "cache server"])
def test_a_working_set_naming_blocks_the_store_lacks_costs_nothing_but_a_look(image, env_dirs,
                                                                            tmp_path, via):
    """A working set is advice: blocks it names that the snapshot or the image do not have (or
    the store lacks) are skipped, and the restore carries on with exact state. Through a cache
    server, where the page server streams the image's part of it unchecked, asking stops after
    one batch of blocks nobody has (else: a batch request per 64 of them, and a retry each)."""
    _snapshot("warm/py:1")
    snap_digest = image.get_tag("warm/py", "1")
    snap = snapfmt.decode(objects.read_manifest_bytes(image, snap_digest))
    real = next(f for f in snap.files if f.name.startswith("criu/pages")).chunks[0]
    rng = random.Random(5)
    bogus = [proffmt.ProfileBlock("sha256:" + rng.randbytes(32).hex(), 4096, i / 1000)
             for i in range(5000)]
    hostile = proffmt.Profile(snap_digest, (*bogus, proffmt.ProfileBlock(real[0], real[1], 6.0)),
                              {"kind": proffmt.WORKING_SET, "page_blocks": 5001, "image_blocks": 0})
    from lazyfs.records import profiles
    profiles.publish(image, hostile)
    server, args, env = None, [], {}
    if via == "cache server":
        from bench.servers import CacheServer
        server = CacheServer(env_dirs["LAZYFS_STORE"], tmp_path / "server-cache",
                             extra=("--no-access-log",)).start()
        args, env = ["--server", server.url], {"LAZYFS_CACHE_DIR": str(tmp_path / "node-2")}
    try:
        r = lazyfs_cli("run", "-v", *args, "--restore", "warm/py:1", "snap/py:1", env=env,
                       check=False, timeout=300)
        # (blocks a batch lacks are asked for once more on their own, and are not found)
        missing = server and _served(server.url, "requests", "/v1/blocks/{digest}", code="404")
    finally:
        if server:
            server.stop()
    assert r.returncode == 7, r.stderr
    out = _lines(r.stdout)
    assert out["continued"][1] == "6" and out["digest"] == [BIG_DIGEST]
    assert _stat(r.stderr, r"of (\d+) blocks prefetched") == 1  # only the block the snapshot has
    assert "took the node agent's mount of the image" in r.stderr
    if server:  # one batch's worth of the 5000, not all of them
        assert 0 < missing <= 64, missing
    else:
        assert "warning" not in r.stderr, r.stderr


def test_criu_check_is_remembered_until_the_binary_or_kernel_changes(env_dirs):
    import json
    path = criu.find()
    remembered = criu._checked_file()
    assert json.loads(remembered.read_text())["path"] == path and criu._passed(path)
    stale = json.loads(remembered.read_text())
    stale["mtime_ns"] += 1  # another build of criu at that path
    remembered.write_text(json.dumps(stale))
    assert not criu._passed(path)
    assert criu.find() == path and criu._passed(path)  # checked again, and remembered again



@pytest.mark.parametrize("mode", ["--eager", "--no-working-set"])
def test_a_restore_killed_with_sigkill_while_criu_makes_its_tree_leaves_no_process(image, env_dirs,
                                                                                   monkeypatch, mode):
    """SIGKILL (the OOM killer) of a restore with no agent over it, while criu restore makes the
    tree: criu dies with it, and the guard it left kills the half-made tree, which would wait
    for criu for ever (or, criu done, poll for a marker no one writes). The next restore
    removes the workspace's mounts."""
    _without_the_agent(monkeypatch)
    before = set(_restore_mounts())
    lazyfs_cli("run", "--snapshot", "warm/slow:6", "snap/py:1", "--", "python3", "/app/slow.py",
               timeout=300)
    restore = [sys.executable, "-m", "lazyfs", "run", "-v", mode, "--restore", "warm/slow:6",
               "snap/py:1"]
    killed = subprocess.Popen(restore, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _criu_making_tree(killed.pid):
            assert time.monotonic() < deadline and killed.poll() is None, "criu restore never ran"
            time.sleep(0.001)
        guards = _guards()
        named_by = time.monotonic() + 5  # (an eager restore's guard names itself as it starts)
        while mode == "--eager" and not guards and time.monotonic() < named_by:
            time.sleep(0.002)
            guards = _guards()
        killed.kill()
        killed.communicate(timeout=60)
        # (an eager restore's guard: in the restore's mount namespace, not criu's, whose
        # workspace mounts it would hold)
        assert len(guards) == (mode == "--eager")
        assert all(_mount_ns(g) in (None, _mount_ns("self")) for g in guards)
        deadline = time.monotonic() + 15
        while (_snapshot_processes() or _guards()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _snapshot_processes() == [] and _guards() == []
        _the_next_restore_removes_what_was_left(restore)
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait()
        for pid in _snapshot_processes():
            os.kill(pid, signal.SIGKILL)
    _assert_the_restore_left_nothing(before, env_dirs, "", within=15)


def _the_next_restore_removes_what_was_left(restore: list[str], left: set = frozenset()) -> None:
    """The restore after a killed one (no agent to sweep) removes what that one left (``left``
    is gone once it runs); then it is stopped."""
    following = subprocess.Popen(restore, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert following.stdout.readline().startswith("continued")
        assert not left & set(_restore_mounts())
        following.send_signal(signal.SIGINT)
        _, err = following.communicate(timeout=60)
    finally:
        if following.poll() is None:
            following.kill()
            following.wait()
    assert "removed what a killed snapshot run or restore left" in err, err


def _guards() -> list[str]:
    """Guards still running (a zombie is its reaper's to collect)."""
    return [p for p in filter(str.isdigit, os.listdir("/proc")) if _comm(p) == "lazyfs-guard"
            and not _zombie(p)]


def _mount_ns(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _zombie(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except OSError:
        return False

"""containerd starts lazyfs images through `lazyfs snapshotter`: a real containerd (Debian's 1.6,
its own root, state and config), a real registry on 127.0.0.1, the node agent, the CRI plugin
pulling as a kubelet does, and `ctr run` starting containers with exact file contents."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from bench.registry import RegistryServer, skip_reason as registry_skip
from imagebuilder.ociwriter import TarEntry, make_tar, write_layout
from bench import containerd as ctrd
from tests.conftest import BUSYBOX, HELD_MOUNTS, lazyfs_cli, lazyfs_mounts

pytestmark = pytest.mark.mount
APPLETS = ("sh", "cat", "ls", "sha256sum", "sleep", "echo", "test")


def _random(n: int, seed: int) -> bytes:
    return hashlib.shake_256(f"containerd-{seed}".encode()).digest(n)


def _layers() -> dict[str, list[bytes]]:
    """Image a (lazyfs has it), b (shares a's first two layers, then one of its own, which
    whites out a file of a's second layer), c (nothing in common with a)."""
    busybox = Path(BUSYBOX).read_bytes()

    def base(marker: bytes) -> bytes:
        return make_tar([TarEntry("bin/", type=tarfile.DIRTYPE, mode=0o755),
                         TarEntry("bin/busybox", busybox, mode=0o755),
                         *[TarEntry(f"bin/{a}", type=tarfile.SYMTYPE, linkname="busybox", mode=0o777)
                           for a in APPLETS],
                         TarEntry("etc/marker", marker)])
    data = make_tar([TarEntry("data/", type=tarfile.DIRTYPE, mode=0o755),
                     TarEntry("data/big", _random(6 << 20, 1)), TarEntry("data/shared", b"from layer two\n")])
    return {"a": [base(b"base\n"), data, make_tar([TarEntry("data/a-only", _random(300_000, 2))])],
            "b": [base(b"base\n"), data, make_tar([TarEntry("data/b-only", _random(200_000, 3)),
                                                   TarEntry("data/.wh.shared")])],
            "c": [base(b"another base\n"), make_tar([TarEntry("data/", type=tarfile.DIRTYPE, mode=0o755),
                                                     TarEntry("data/c-only", _random(100_000, 4))])]}


def _diff_ids(tars: list[bytes]) -> list[str]:
    return ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Node:
    """Registry, store, node agent, snapshotter and containerd, each torn down at the end."""

    def __init__(self, work: Path, sockdir: Path):
        self.work, self.sockdir = work, sockdir
        self.store = work / "store"
        self.snap_socket = sockdir / "snapshotter.sock"
        self.snap_root = work / "snapshotter"
        self.snap_log = work / "snapshotter.log"
        self.snapshotter: subprocess.Popen | None = None
        self.env = {**os.environ, "LAZYFS_STATE_DIR": str(work / "state"), "LAZYFS_CACHE_DIR": str(work / "cache"),
                    "LAZYFS_NODE_SOCKET": str(sockdir / "node.sock"), "LAZYFS_NODE_METRICS": "127.0.0.1:0",
                    "LAZYFS_NODE_IDLE": "1s"}

    def start_snapshotter(self) -> None:
        with open(self.snap_log, "ab") as log:
            self.snapshotter = subprocess.Popen(
                [sys.executable, "-m", "lazyfs.cli", "snapshotter", "--socket", str(self.snap_socket),
                 "--root", str(self.snap_root), "--store", str(self.store), "-v"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while b"serving containerd" not in self.snap_log.read_bytes():
            if self.snapshotter.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the snapshotter did not start: {self.snap_log.read_text()[-2000:]}")
            time.sleep(0.05)

    def agent_pid(self) -> int | None:
        pidfile = self.work / "state" / "node" / "agent.pid"
        return int(pidfile.read_text()) if pidfile.exists() else None

    def status(self) -> dict:
        out = subprocess.run([sys.executable, "-m", "lazyfs.cli", "node", "status", "--json"], env=self.env,
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    def snapshot_users(self) -> list[dict]:
        return [u for im in self.status()["images"] for u in im["users"] if u["kind"] == "snapshot"]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    for reason in (ctrd.skip_reason(), registry_skip()):
        if reason:
            pytest.skip(reason)
    work = tmp_path_factory.mktemp("containerd")
    HELD_MOUNTS.add(work)  # the node's mounts live as long as this module, not one test
    sockdir = Path(tempfile.mkdtemp(prefix="lzc-", dir="/tmp"))  # short: Unix socket paths
    n = Node(work, sockdir)
    registry = RegistryServer(work / "registry").start()
    daemon = None
    try:
        n.layers = _layers()
        for name, tars in n.layers.items():
            layout = write_layout(work / f"layout-{name}", tars, tag="1")
            registry.push(f"oci:{layout}:1", f"img/{name}:1")
        n.registry = registry
        lazyfs_cli("build", f"docker://{registry.host}/img/a:1", "--tls-verify=false", "--store", n.store)
        n.start_snapshotter()
        daemon = ctrd.Containerd(work / "ctrd", n.snap_socket, registry.host).start()
        n.containerd = daemon
        yield n
    finally:
        if daemon is not None:
            for line in daemon.ctr("containers", "ls", "-q", check=False).stdout.split():
                daemon.ctr("tasks", "kill", "-s", "SIGKILL", line, check=False)
                time.sleep(0.2)
                daemon.ctr("containers", "rm", line, check=False)
            daemon.stop()
        _stop(n.snapshotter)
        registry.stop()
        pid = n.agent_pid()
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            time.sleep(1)
        for mp in sorted(lazyfs_mounts(str(work)) + ctrd._mounts_under(work), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        subprocess.run(["rm", "-rf", str(sockdir)])
        HELD_MOUNTS.discard(work)


def _layer_gets(node: Node, name: str, since: int) -> list[str]:
    """Layer blobs of image ``name`` the registry served after ``since`` (an offset in its access
    log: `lazyfs build` read them all before)."""
    blobs = set(_diff_blob_digests(node, name))
    log = node.registry.log.read_text()[since:]
    return [d for d in re.findall(r'"GET /v2/img/%s/blobs/(sha256:[0-9a-f]{64})' % name, log) if d in blobs]


def _mark(node: Node) -> int:
    return len(node.registry.log.read_text())


def _diff_blob_digests(node: Node, name: str) -> list[str]:
    index = json.loads((node.work / f"layout-{name}" / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    blob = node.work / f"layout-{name}" / "blobs" / "sha256" / manifest_digest[7:]
    return [layer["digest"] for layer in json.loads(blob.read_text())["layers"]]


def _run(node: Node, image: str, cid: str, script: str) -> str:
    return node.containerd.ctr("run", "--rm", "--snapshotter", "lazyfs", f"{node.registry.host}/img/{image}:1",
                               cid, "/bin/sh", "-c", script).stdout


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_pull_of_an_image_lazyfs_has_downloads_no_layer_and_runs_exact(node):
    ref = f"{node.registry.host}/img/a:1"
    mark = _mark(node)
    node.containerd.cri_pull(ref)
    assert _layer_gets(node, "a", mark) == []  # every layer served lazily: none downloaded
    assert node.status()["agent"]["snapshots"]["lazy"] == 3
    out = _run(node, "a", "a1", "sha256sum /data/big /data/a-only; cat /data/shared /etc/marker")
    layers = node.layers["a"]
    assert _sha(_random(6 << 20, 1)) in out and _sha(_random(300_000, 2)) in out
    assert "from layer two\nbase\n" in out
    assert len(layers) == 3


def test_an_image_lazyfs_lacks_is_unpacked_by_containerd_logged_and_counted(node):
    before = node.status()["agent"]["snapshots"]["fallbacks"]
    mark = _mark(node)
    node.containerd.cri_pull(f"{node.registry.host}/img/c:1")
    assert sorted(_layer_gets(node, "c", mark)) == sorted(_diff_blob_digests(node, "c"))  # downloaded
    status = node.status()["agent"]["snapshots"]
    assert status["fallbacks"] == before + 2
    chain = _chain(node, "c", 2)
    assert status["last_fallback"] == chain
    assert f"FALLBACK: layer chain {chain} is not in the lazyfs store" in node.snap_log.read_text()
    out = _run(node, "c", "c1", "sha256sum /data/c-only; cat /etc/marker; ls /data")
    assert _sha(_random(100_000, 4)) in out and "another base\n" in out
    assert "big" not in out


def _chain(node: Node, name: str, n: int) -> str:
    from lazyfs.format import chain
    return chain.chain_ids(_diff_ids(node.layers[name]))[n - 1]


def test_shared_base_layers_hold_exactly_their_chain(node):
    """b shares a's first two layers: containerd takes lazyfs's snapshot of that chain as the
    parent of the layer it unpacks itself, so the lazy snapshot must hold the chain, not all of a."""
    lazy_before = node.status()["agent"]["snapshots"]["lazy"]
    mark = _mark(node)
    node.containerd.cri_pull(f"{node.registry.host}/img/b:1")
    b_blobs = _diff_blob_digests(node, "b")
    assert _layer_gets(node, "b", mark) == [b_blobs[2]]  # only the layer lazyfs lacks
    assert node.status()["agent"]["snapshots"]["lazy"] == lazy_before  # the chain existed already
    out = _run(node, "b", "b1", "ls /data; sha256sum /data/big /data/b-only; cat /etc/marker")
    assert "a-only" not in out and "shared" not in out  # a's third layer absent; whiteout honoured
    assert _sha(_random(6 << 20, 1)) in out and _sha(_random(200_000, 3)) in out


def test_killing_the_snapshotter_and_the_agent_leaves_containers_and_snapshots(node):
    ctr = node.containerd
    before = sorted(ctr.ctr("snapshots", "--snapshotter", "lazyfs", "ls").stdout.splitlines())
    reader = subprocess.Popen(
        [ctrd.CTR, "-a", str(ctr.socket), "-n", ctrd.NAMESPACE, "run", "--rm", "--snapshotter", "lazyfs",
         f"{node.registry.host}/img/a:1", "reader", "/bin/sh", "-c",
         "for i in 1 2 3 4 5 6 7 8; do sha256sum /data/big; sleep 0.5; done"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        node.snapshotter.kill()
        node.snapshotter.wait()
        os.kill(node.agent_pid(), signal.SIGKILL)
        time.sleep(0.5)
        node.start_snapshotter()
        out, errs = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
    assert reader.returncode == 0, errs
    assert out.count(_sha(_random(6 << 20, 1))) == 8  # every read exact, before and after
    after = sorted(ctr.ctr("snapshots", "--snapshotter", "lazyfs", "ls").stdout.splitlines())
    assert after == before
    # A new container after both restarts: the agent (started again on demand) adopted the mount.
    out = _run(node, "a", "a2", "sha256sum /data/a-only")
    assert _sha(_random(300_000, 2)) in out


def test_removing_the_images_releases_the_mounts(node):
    ctr = node.containerd
    # b's own layer, unpacked onto the lazy chain, still holds its lease after both restarts
    assert [u for u in node.snapshot_users() if u["target"].startswith(f"{node.snap_root}#")]
    top = _chain(node, "a", 3)  # containerd's name for a's top layer snapshot
    ctr.ctr("snapshots", "--snapshotter", "lazyfs", "prepare", "probe", top)
    ctr.ctr("snapshots", "--snapshotter", "lazyfs", "mounts", "/mnt", "probe")
    assert any(u["target"].endswith("#%d" % _snapshot_id(node, "probe")) for u in node.snapshot_users())
    ctr.ctr("snapshots", "--snapshotter", "lazyfs", "rm", "probe")
    # CRI names each image it pulls three ways (tag, repo@digest, config ID): remove all.
    names = ctr.ctr("images", "ls", "-q").stdout.split()
    assert len(names) == 9
    ctr.ctr("images", "rm", "--sync", *names)
    deadline = time.monotonic() + 30
    while (node.snapshot_users() or _backend_snapshots(node)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node.snapshot_users() == [] and _backend_snapshots(node) == []
    assert not list((node.snap_root / "snapshots").iterdir())


def _snapshot_id(node: Node, key_suffix: str) -> int:
    import sqlite3
    with sqlite3.connect(str(node.snap_root / "metadata.db")) as db:
        rows = db.execute("SELECT id, name FROM snapshots").fetchall()
    return next(i for i, name in rows if name.endswith("/" + key_suffix))


def _backend_snapshots(node: Node) -> list[str]:
    import sqlite3
    with sqlite3.connect(str(node.snap_root / "metadata.db")) as db:
        return [r[0] for r in db.execute("SELECT name FROM snapshots")]

"""Startup profiles learnt by the fleet: a cold start on one node contributes what it read through
its cache server, a cold start on another node prefetches it; nodes contribute without the
store's write token, a server can refuse them, and hostile contributions cost bounded bandwidth,
never a wrong byte."""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import pytest

from bench.servers import CacheServer
from lazyfs.errors import NotFound, StoreAuthError, StoreError
from lazyfs.format import block
from lazyfs.format import profile as proffmt
from lazyfs.records import objects
from lazyfs.store.http import HttpStore
from lazyfs.store.local import LocalStore
from tests.conftest import busybox_rootfs, lazyfs_cli, needs_mount

pytestmark = needs_mount
MiB = 1024 * 1024
TAG = "learn/bb:1"
COMMAND = ["sh", "-c", "cat /data/a /data/b | sha256sum"]
NODE_TOKEN = "node-token-0123456789abcdef"
WRITE_TOKEN = "write-token-0123456789abcdef"


def _image(root: Path, tag: str = TAG, seed: int = 0) -> str:
    """Build a busybox image with three data files; the sha256 of /data/a + /data/b."""
    busybox_rootfs(root)
    (root / "data").mkdir(exist_ok=True)
    for i, (name, n) in enumerate([("a", 3 * MiB + 5), ("b", MiB), ("c", 2 * MiB)]):
        (root / "data" / name).write_bytes(random.Random(f"{seed}-{i}").randbytes(n))
    lazyfs_cli("build", f"dir:{root}", "--tag", tag)
    return hashlib.sha256((root / "data" / "a").read_bytes() + (root / "data" / "b").read_bytes()).hexdigest()


def _run(server: CacheServer, node: Path, stats: Path, env: dict | None = None) -> str:
    res = lazyfs_cli("run", "--runtime", "namespaces", "--no-node", "--server", server.url,
                     "--cache-dir", node, "--stats-json", stats, TAG, "--", *COMMAND, env=env)
    return res.stdout.split()[0]


def _learnt(store: LocalStore, timeout: float = 20.0) -> proffmt.Profile | None:
    """The store's profile of the image and COMMAND, waiting for the contribution an unmount
    sends (None if none arrives)."""
    image = objects.resolve(store, TAG)
    target = proffmt.tag_for(image, proffmt.workload_key(COMMAND))
    deadline = time.monotonic() + timeout
    while True:
        try:
            return proffmt.decode(objects.read_manifest_bytes(store, store.get_tag(*target)))
        except NotFound:
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def _blocks_of(store: LocalStore, path: str) -> set[str]:
    manifest = objects.read_manifest(store, objects.resolve(store, TAG))
    return {c.digest for e in manifest.entries if e.path == path.encode() for c in e.chunks}


def _server(env_dirs, tmp_path, name: str, *extra) -> CacheServer:
    (tmp_path / "write-token").write_text(WRITE_TOKEN + "\n")
    return CacheServer(env_dirs["LAZYFS_STORE"], tmp_path / name,
                       token_file=tmp_path / "write-token", extra=extra).start()


def test_a_cold_start_learns_the_profile_the_next_node_prefetches(env_dirs, tmp_path):
    expected = _image(tmp_path / "rootfs")
    store = LocalStore(env_dirs["LAZYFS_STORE"])
    server = _server(env_dirs, tmp_path, "server-cache")
    try:
        # Node A: the first start of the image anywhere. No profile; it contributes what it read.
        assert _run(server, tmp_path / "node-a", tmp_path / "a.json") == expected
        a = json.loads((tmp_path / "a.json").read_text())
        assert "prefetch" not in a and a["learn"]["recorded"] > 0
        learnt = _learnt(store)
        assert learnt is not None, "node A contributed no profile"
        listed = [b.digest for b in learnt.blocks]
        da, db, dc = (_blocks_of(store, f"data/{n}") for n in "abc")
        assert da | db <= set(listed) and not dc & set(listed)  # what it read, not what it did not
        assert learnt.meta["starts"] == 1 and learnt.meta["workload"] == proffmt.workload_key(COMMAND)
        assert server.metrics()["lazyfs_server_profile_contributions_total"] == 1

        # Node B, another empty node: it prefetches what node A read, and reads exact bytes.
        assert _run(server, tmp_path / "node-b", tmp_path / "b.json") == expected
        b = json.loads((tmp_path / "b.json").read_text())
        assert b["prefetch"]["planned"] == len(listed) and b["prefetch"]["failed"] == 0
        assert b["prefetch"]["fetched"] + b["cache"]["misses"] >= len(listed)
        # Node B read nothing the profile lacked: it contributes nothing, the profile stays.
        time.sleep(1)
        assert _learnt(store).meta["starts"] == 1
    finally:
        server.stop()


def test_nodes_contribute_with_the_node_token_and_a_refused_contribution_costs_nothing(env_dirs, tmp_path):
    expected = _image(tmp_path / "rootfs")
    store = LocalStore(env_dirs["LAZYFS_STORE"])
    (tmp_path / "node-token").write_text(NODE_TOKEN + "\n")
    server = _server(env_dirs, tmp_path, "server-cache", "--node-token-file", str(tmp_path / "node-token"))
    try:
        # A node without the node token reads (reads are open) but may not contribute.
        assert _run(server, tmp_path / "node-a", tmp_path / "a.json", env={"LAZYFS_TOKEN": ""}) == expected
        deadline = time.monotonic() + 20
        while server.metrics()["lazyfs_server_profile_contributions_total"] < 1:
            assert time.monotonic() < deadline, "the refused contribution never arrived"
            time.sleep(0.2)
        assert _learnt(store, timeout=0) is None  # refused: nothing written
        node = HttpStore(server.url, token=NODE_TOKEN)
        try:
            # The node token is no write token.
            digest, frame = block.encode(b"not allowed")
            with pytest.raises(StoreAuthError):
                node.put_block(digest, frame)
            with pytest.raises(StoreAuthError):
                node.put_tag("learn/bb", "evil", objects.resolve(store, TAG))
        finally:
            node.close()
        # With the node token, the same start's profile is taken.
        assert _run(server, tmp_path / "node-b", tmp_path / "b.json",
                    env={"LAZYFS_TOKEN": NODE_TOKEN}) == expected
        assert _learnt(store) is not None
    finally:
        server.stop()
    # A server that takes no profiles refuses them with one clear answer.
    server = _server(env_dirs, tmp_path, "server-cache-2", "--no-profiles")
    try:
        client = HttpStore(server.url)
        image = objects.resolve(store, TAG)
        with pytest.raises(StoreError, match="no startup profiles"):
            client.contribute_profile(image, None, proffmt.encode(proffmt.Profile(image, ())))
        client.close()
    finally:
        server.stop()


def test_hostile_contributions_are_bounded_and_never_cost_a_wrong_byte(env_dirs, tmp_path):
    expected = _image(tmp_path / "rootfs")
    _image(tmp_path / "other", tag="learn/other:1", seed=9)
    store = LocalStore(env_dirs["LAZYFS_STORE"])
    image = objects.resolve(store, TAG)
    other = objects.read_manifest(store, objects.resolve(store, "learn/other:1"))
    workload = proffmt.workload_key(COMMAND)
    server = _server(env_dirs, tmp_path, "server-cache")
    client = HttpStore(server.url)
    try:
        def send(blocks, img=image):
            return client.contribute_profile(img, workload, proffmt.encode(proffmt.Profile(img, tuple(blocks))))

        rand = [proffmt.ProfileBlock("sha256:" + hashlib.sha256(str(i).encode()).hexdigest(), 1 << 24, 0.0)
                for i in range(5000)]
        assert send(rand)["accepted"] == 0  # random digests: none is the image's
        own = {c.digest for e in objects.read_manifest(store, image).entries for c in e.chunks}
        foreign = [proffmt.ProfileBlock(c.digest, c.size, 0.0) for e in other.entries for c in e.chunks
                   if c.digest not in own]
        assert foreign and send(foreign)["accepted"] == 0  # another image's blocks
        assert _learnt(store, timeout=0) is None  # nothing merged, nothing written
        # A million entries: refused before it is read whole.
        huge = b"".join([proffmt.MAGIC, b'{"blocks":[', b'["sha256:' + b"a" * 64 + b'",1,0],' * 1_000_000])
        with pytest.raises(StoreError):
            client._request("POST", f"/v1/profiles/{image}", body=huge)
        # Sizes no block has are not a profile; sizes come from the manifest, whatever the
        # contribution says.
        with pytest.raises(StoreError, match="400"):
            send([proffmt.ProfileBlock(d, 1 << 40, 0.0) for d in sorted(_blocks_of(store, "data/c"))])
        lying = [proffmt.ProfileBlock(d, 1 << 24, 0.0) for d in sorted(_blocks_of(store, "data/c"))]
        assert send(lying)["accepted"] == len(lying)
        learnt = _learnt(store)
        sizes = {c.digest: c.size for e in objects.read_manifest(store, image).entries for c in e.chunks}
        assert all(b.size == sizes[b.digest] for b in learnt.blocks)
        assert learnt.bytes <= 2 * MiB + 4096
        # The node that prefetches this profile (blocks it never reads) still reads exact bytes.
        assert _run(server, tmp_path / "node-a", tmp_path / "a.json") == expected
        a = json.loads((tmp_path / "a.json").read_text())
        assert a["prefetch"]["planned"] == len(lying) and a["store"]["wrong_bytes"] == 0
    finally:
        client.close()
        server.stop()


def test_a_start_served_by_the_image_profile_seeds_its_workload_profile(env_dirs, tmp_path):
    """On the kernel path a start that prefetched the image's profile sees only what that profile
    lacked (the blocks it prefetched are read from the node cache, unseen); the workload's first
    profile is that profile with this start's misses, not the misses alone. The image's profile
    here is of /data/c, which this workload never reads: only the seeding can bring it in."""
    expected = _image(tmp_path / "rootfs")
    store = LocalStore(env_dirs["LAZYFS_STORE"])
    lazyfs_cli("profile", "--runtime", "namespaces", TAG, "--", "sh", "-c", "cat /data/c > /dev/null")
    image = objects.resolve(store, TAG)
    manual = proffmt.decode(objects.read_manifest_bytes(store, store.get_tag(*proffmt.tag_for(image))))
    server = _server(env_dirs, tmp_path, "server-cache")
    try:
        assert _run(server, tmp_path / "node-a", tmp_path / "a.json") == expected
        assert json.loads((tmp_path / "a.json").read_text())["prefetch"]["planned"] == len(manual.blocks)
        learnt = _learnt(store)
        assert learnt is not None
        listed = {b.digest for b in learnt.blocks}
        assert _blocks_of(store, "data/c") <= {b.digest for b in manual.blocks} <= listed
        assert _blocks_of(store, "data/a") | _blocks_of(store, "data/b") <= listed  # its own reads
    finally:
        server.stop()


def test_guessed_blocks_count_only_if_something_read_them(env_dirs, tmp_path):
    """Reading a directory's first small file fetches its other small files on a guess; on the
    kernel data path the kernel then reads those it needs from the node cache, unseen by the
    daemon. The learnt profile keeps the guesses that were read, and only those."""
    root = tmp_path / "rootfs"
    _image(root)
    pkg = root / "data" / "pkg"
    pkg.mkdir()
    for i in range(12):
        (pkg / f"m{i:02d}.py").write_bytes(random.Random(f"pkg-{i}").randbytes(20_000 + i))
    lazyfs_cli("build", f"dir:{root}", "--tag", TAG)
    store = LocalStore(env_dirs["LAZYFS_STORE"])
    read = ["m00.py", "m03.py", "m07.py"]
    command = ["sh", "-c", "sleep 0.5; " + "; sleep 0.2; ".join(f"cat /data/pkg/{n} > /dev/null" for n in read)]
    server = _server(env_dirs, tmp_path, "server-cache")
    try:
        lazyfs_cli("run", "--runtime", "namespaces", "--no-node", "--server", server.url,
                   "--cache-dir", tmp_path / "node", "--stats-json", tmp_path / "a.json", TAG, "--", *command)
        stats = json.loads((tmp_path / "a.json").read_text())
        image = objects.resolve(store, TAG)
        target = proffmt.tag_for(image, proffmt.workload_key(command))
        deadline = time.monotonic() + 20
        while True:
            try:
                learnt = proffmt.decode(objects.read_manifest_bytes(store, store.get_tag(*target)))
                break
            except NotFound:
                assert time.monotonic() < deadline, "no profile was learnt"
                time.sleep(0.2)
        listed = {b.digest for b in learnt.blocks}
        wanted = set().union(*(_blocks_of(store, f"data/pkg/{n}") for n in read))
        unread = set().union(*(_blocks_of(store, f"data/pkg/m{i:02d}.py") for i in range(12)
                               if f"m{i:02d}.py" not in read))
        assert wanted <= listed, "a file the workload read is missing from the profile"
        assert stats["data_path"] != "kernel" or stats["learn"]["guessed"] > 0
        assert not unread & listed, "files only fetched on a guess were taken for reads"
    finally:
        server.stop()

"""Micro-benchmarks of the hot paths (pytest-benchmark), outside the default test run:

    .venv/bin/pytest bench/micro -o addopts= --benchmark-only

Hashing and inflating a block, manifest decode of a 30,000-entry tree, a warm read through a real
FUSE mount, and a block GET from a real cache server on loopback. Each also checks its answer, so
a fast wrong result cannot pass.
"""
from __future__ import annotations

import hashlib
import os
import random
import urllib.request

import pytest

from lazyfs.format import block, manifest as mf
from lazyfs.format.manifest import Chunk, Entry, EntryType, Manifest
from lazyfs.store.local import LocalStore

BLOCK = 512 * 1024


@pytest.fixture(scope="module")
def data() -> bytes:
    # Half random, half text-like: about what an ML image's blocks compress like.
    rnd = random.Random(7)
    return rnd.randbytes(BLOCK // 2) + b"".join(b"def f%d(x): return x\n" % i for i in range(20000))[:BLOCK // 2]


def test_sha256_block(benchmark, data):
    digest = benchmark(lambda: hashlib.sha256(data).hexdigest())
    assert len(digest) == 64


def test_compress_block(benchmark, data):
    digest, frame = benchmark(block.encode, data)
    assert block.decode(digest, frame) == data


def test_inflate_and_verify_block(benchmark, data):
    digest, frame = block.encode(data)
    assert benchmark(block.decode, digest, frame, len(data)) == data


@pytest.fixture(scope="module")
def big_manifest() -> bytes:
    entries = [Entry(b"", EntryType.DIR, 0o755)]
    for d in range(300):
        entries.append(Entry(b"pkg%03d" % d, EntryType.DIR, 0o755))
        for f in range(100):
            h = hashlib.sha256(b"%d/%d" % (d, f)).hexdigest()
            entries.append(Entry(b"pkg%03d/mod%03d.py" % (d, f), EntryType.REG, 0o644, size=1000 + f,
                                 chunks=(Chunk("sha256:" + h, 1000 + f),)))
    return mf.encode(Manifest(tuple(entries), {"Cmd": ["python3"]}, BLOCK))


def test_manifest_decode_30k_entries(benchmark, big_manifest):
    m = benchmark(mf.decode, big_manifest)
    assert len(m.entries) == 1 + 300 * 101


@pytest.fixture(scope="module")
def mounted(tmp_path_factory):
    from tests.conftest import lazyfs_cli, mount_skip_reason
    if mount_skip_reason():
        pytest.skip(mount_skip_reason())
    base = tmp_path_factory.mktemp("micro")
    root = base / "rootfs"
    root.mkdir()
    payload = os.urandom(8 * BLOCK)
    (root / "file.bin").write_bytes(payload)
    env = {"LAZYFS_STORE": str(base / "store"), "LAZYFS_CACHE_DIR": str(base / "cache"),
           "LAZYFS_STATE_DIR": str(base / "state")}
    lazyfs_cli("build", f"dir:{root}", "--tag", "micro/m:1", env=env)
    (base / "mnt").mkdir()
    lazyfs_cli("mount", "micro/m:1", base / "mnt", env=env)
    yield base, payload, env
    lazyfs_cli("umount", base / "mnt", env=env, check=False)


def test_warm_read_through_the_mount(benchmark, mounted):
    """4 MiB through a fresh open each time: the node cache is warm, the page cache serves
    repeats (kernel_cache), so this is the FUSE + kernel path without fetches."""
    base, payload, _ = mounted
    path = base / "mnt" / "file.bin"

    def read() -> bytes:
        with open(path, "rb", buffering=0) as f:
            return f.read()
    assert benchmark(read) == payload


def test_block_get_from_cache_server(benchmark, tmp_path, data):
    from cache_server.server import ServerThread
    store = LocalStore(tmp_path / "origin")
    digest, frame = block.encode(data)
    store.put_block(digest, frame)
    with ServerThread(store, tmp_path / "cache") as server:
        url = server.url

        def get() -> bytes:
            with urllib.request.urlopen(f"{url}/v1/blocks/{digest}") as r:
                return r.read()
        get()  # warm the server's cache: measure hits
        assert benchmark(get) == frame

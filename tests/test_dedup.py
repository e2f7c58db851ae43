"""Identical content is stored once, across files and across images, and inspect reports it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from lazyfs.format.manifest import DEFAULT_CHUNK_SIZE
from lazyfs.records import objects
from lazyfs.store.local import LocalStore
from tests.conftest import lazyfs_cli


def _tree(root: Path, shared: bytes, own: bytes) -> Path:
    (root / "lib").mkdir(parents=True)
    (root / "lib" / "shared.so").write_bytes(shared)
    (root / "lib" / "copy-of-shared.so").write_bytes(shared)  # within one image too
    (root / "own.bin").write_bytes(own)
    return root


def test_shared_content_is_stored_once(tmp_path, env_dirs):
    shared = os.urandom(3 * 1024 * 1024 + 7)
    a = _tree(tmp_path / "a", shared, os.urandom(100_000))
    b = _tree(tmp_path / "b", shared, os.urandom(200_000))
    store = LocalStore(env_dirs["LAZYFS_STORE"])
    lazyfs_cli("build", f"dir:{a}", "--tag", "dedup/a:1")
    after_a = {b.digest for b in store.list_blocks()}
    n_shared = -(-len(shared) // DEFAULT_CHUNK_SIZE)
    assert len(after_a) == n_shared + 1  # shared's chunks (stored once for two files) + own
    proc = lazyfs_cli("build", f"dir:{b}", "--tag", "dedup/b:1")
    after_b = {b.digest for b in store.list_blocks()}
    assert len(after_b - after_a) == 1  # only b's own file is new
    assert "1 new" in proc.stderr

    info = json.loads(lazyfs_cli("inspect", "dedup/b:1", "--json").stdout)
    assert info["files"] == 3 and info["blocks"] == n_shared + 1
    assert info["bytes"] == 2 * len(shared) + 200_000
    assert info["block_bytes"] == len(shared) + 200_000
    assert info["dedup_ratio"] > 1.9
    assert info["shared_blocks"] == n_shared
    manifest_b = objects.read_manifest(store, info["digest"])
    shared_digests = {c.digest for e in manifest_b.entries for c in e.chunks} & after_a
    assert len(shared_digests) == n_shared
    assert info["shared_bytes_stored"] == sum(store.block_size(d) for d in shared_digests)

    summary = json.loads(lazyfs_cli("images", "--json").stdout)["store"]
    assert summary["images"] == 2
    assert summary["logical_bytes"] == 4 * len(shared) + 300_000
    assert summary["unique_block_bytes"] == len(shared) + 300_000
    assert summary["bytes_stored"] == sum(store.block_size(d) for d in after_b)

"""Layer chains: a build tags, for each prefix of an image's layers, the lazyfs image holding
exactly that prefix's tree, under the chain ID containerd names that snapshot by."""
from __future__ import annotations

import hashlib
import os
import tarfile

import pytest
from hypothesis import given, strategies as st

from imagebuilder.build import build
from imagebuilder.ociwriter import TarEntry, make_tar, write_layout
from lazyfs.errors import FormatError
from lazyfs.format import block, chain as chainfmt, manifest as mf
from lazyfs.records import chains, gc, objects
from lazyfs.store.local import LocalStore

LAYERS = [
    [TarEntry("etc/", type=tarfile.DIRTYPE, mode=0o755), TarEntry("etc/base", b"base v1\n"),
     TarEntry("gone", b"removed by layer 2\n"), TarEntry("big", bytes(range(256)) * 5000)],
    [TarEntry("etc/base", b"base v2\n"), TarEntry(".wh.gone"), TarEntry("two", b"layer two\n")],
    [TarEntry("three", b"layer three\n"), TarEntry("big", b"replaced\n")],
]


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_chain_ids_follow_the_oci_image_spec():
    a, b, c = (_digest(x) for x in (b"a", b"b", b"c"))
    ab = _digest(f"{a} {b}".encode())
    assert chainfmt.chain_ids([a, b, c]) == [a, ab, _digest(f"{ab} {c}".encode())]
    assert chainfmt.chain_ids([]) == []
    with pytest.raises(FormatError):
        chainfmt.chain_ids([a, "sha256:nothex"])


@given(st.lists(st.binary(max_size=8), min_size=1, max_size=6))
def test_a_chain_id_names_its_whole_prefix(parts):
    ids = chainfmt.chain_ids([_digest(p) for p in parts])
    assert len(ids) == len(parts) and len(set(ids)) == len(ids)  # no prefix collides with another
    assert chainfmt.chain_ids([_digest(p) for p in parts[:-1]]) == ids[:-1]  # prefixes are stable


def _entries(store, digest: str) -> list:
    return list(mf.decode(objects.read_manifest_bytes(store, digest)).entries)


def test_each_chain_is_the_image_of_its_layers(tmp_path):
    tars = [make_tar(layer) for layer in LAYERS]
    store = LocalStore(tmp_path / "store")
    top = build(f"oci:{write_layout(tmp_path / 'img', tars)}:latest", store, "app:1")
    expect = chainfmt.chain_ids([_digest(t) for t in tars])
    assert top.chains == expect
    assert chains.find(store, expect[-1]) == top.digest  # the whole image is its top chain
    for k in (1, 2):
        only = build(f"oci:{write_layout(tmp_path / f'prefix{k}', tars[:k])}:latest",
                     LocalStore(tmp_path / f"store{k}"))
        found = chains.find(store, expect[k - 1])
        assert found and found != top.digest
        assert _entries(store, found) == _entries(LocalStore(tmp_path / f"store{k}"), only.digest)
        for entry in _entries(store, found):  # blocks a later layer replaced are kept for the chain
            for chunk in entry.chunks:
                objects.fetch_block(store, chunk.digest, chunk.size)
    assert chains.find(store, _digest(b"no such chain")) is None
    # A chain tag whose image is gone (swept, or never finished publishing) finds nothing: a
    # containerd pull then unpacks the layer itself instead of relying on it for good.
    found = chains.find(store, expect[0])
    store._manifest_path(found).unlink()
    assert chains.find(store, expect[0]) is None


def test_a_tree_read_from_a_directory_has_no_chains(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "f").write_text("x")
    result = build(f"dir:{tmp_path / 'root'}", LocalStore(tmp_path / "store"))
    assert result.chains == []
    assert not [t for t in LocalStore(tmp_path / "store").list_tags() if t[0] == chainfmt.TAG_NAME]


def _chain_image(store, data: bytes, chunk_size: int) -> tuple[str, set[str]]:
    """A chain image of one file cut at ``chunk_size``, stored with its blocks: (manifest
    digest, block digests)."""
    chunks = []
    for at in range(0, len(data), chunk_size):
        digest, frame = block.encode(data[at:at + chunk_size])
        store.put_block(digest, frame)
        chunks.append(mf.Chunk(digest, len(data[at:at + chunk_size])))
    root = mf.Entry(b"", mf.EntryType.DIR, 0o755)
    f = mf.Entry(b"f", mf.EntryType.REG, size=len(data), chunks=tuple(chunks))
    manifest = mf.Manifest((root, f), chainfmt.CHAIN_CONFIG, chunk_size)
    return objects.write_manifest(store, manifest), {c.digest for c in chunks}


def test_a_rebuild_keeps_the_chain_image_a_snapshot_may_already_mount(tmp_path):
    # The same chain built again with another --chunk-size (or another EROFS layout version,
    # which changes the metadata record the manifest names) is a second manifest of the same
    # content. The tag keeps the first: snapshots and mounts name it by digest, and a tag moved
    # to the second would leave it, reachable from no tag, to gc.
    store = LocalStore(tmp_path / "store")
    chain, data = _digest(b"base layer"), os.urandom(8192)
    first, first_blocks = _chain_image(store, data, 4096)
    chains.publish(store, [chain], [first])
    second, _ = _chain_image(store, data, 8192)
    chains.publish(store, [chain], [second])
    assert chains.find(store, chain) == first
    gc.collect_store(store, grace=0)
    assert chains.find(store, chain) == first
    for digest in first_blocks:
        objects.fetch_block(store, digest, 4096)
    # A tag whose image is gone keeps nothing: the next build points it at its own.
    store._manifest_path(first).unlink()
    third, _ = _chain_image(store, data, 8192)
    chains.publish(store, [chain], [third])
    assert chains.find(store, chain) == third
    # Nor does one whose bytes are not the ones it names.
    store._manifest_path(third).write_bytes(block.encode(b"other bytes")[1])
    again, _ = _chain_image(store, data, 4096)
    chains.publish(store, [chain], [again])
    assert again == first and chains.find(store, chain) == first

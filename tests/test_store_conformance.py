"""The contract every BlockStore must meet. Each backend is added to conftest.STORE_FACTORIES."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from lazyfs.errors import BlockNotFound, DigestMismatch, LazyfsError, ManifestNotFound, TagNotFound
from lazyfs.format import block
from lazyfs.format.manifest import Entry, EntryType, Manifest
from lazyfs.records import objects


def test_check(any_store):
    any_store.check()
    any_store.check(write=True)


def test_block_put_get_has_size(any_store):
    digest, frame = block.encode(b"hello world" * 100)
    assert not any_store.has_block(digest)
    assert any_store.block_size(digest) is None
    assert any_store.put_block(digest, frame) is True
    assert any_store.has_block(digest)
    assert any_store.block_size(digest) == len(frame)
    assert any_store.get_block(digest) == frame
    assert any_store.put_block(digest, frame) is False  # idempotent, reports "already there"
    listed = {b.digest: b for b in any_store.list_blocks()}
    assert listed[digest].size == len(frame) and listed[digest].mtime > 0
    any_store.delete_block(digest)
    assert not any_store.has_block(digest)
    any_store.delete_block(digest)  # deleting what is gone is fine


def test_put_blocks_batch(any_store):
    blocks = [block.encode(bytes([i]) * (1000 + i)) for i in range(40)]
    any_store.put_block(*blocks[3])
    results = dict(any_store.put_blocks(iter(blocks)))
    assert set(results) == {d for d, _ in blocks}
    assert [d for d, new in results.items() if not new] == [blocks[3][0]]
    for digest, frame in blocks:
        assert any_store.get_block(digest) == frame


def test_put_blocks_passes_the_callers_errors_on_unchanged(any_store):
    """An error reading what is to be stored (a file gone) is the caller's, not the store's:
    it must not come back as StoreUnavailable."""
    def items():
        yield block.encode(b"first block")
        raise FileNotFoundError(2, "No such file or directory", "/snapshot/upper.tar")
    with pytest.raises(FileNotFoundError, match="upper.tar"):
        list(any_store.put_blocks(items()))


def test_missing_objects_raise_typed_errors(any_store):
    digest = block.encode(b"absent")[0]
    with pytest.raises(BlockNotFound) as exc:
        any_store.get_block(digest)
    assert exc.value.digest == digest
    with pytest.raises(ManifestNotFound):
        any_store.get_manifest(digest)
    with pytest.raises(TagNotFound) as missing:
        any_store.get_tag("nothing", "here")
    assert str(missing.value).startswith(f"image nothing:here not found in store {any_store.url} ")


def test_invalid_digests_are_refused(any_store):
    for bad in ["sha256:../../etc/passwd", "../x", "sha256:" + "G" * 64]:
        with pytest.raises(LazyfsError):
            any_store.get_block(bad)
        with pytest.raises(LazyfsError):
            any_store.put_block(bad, b"x")


def test_manifest_and_tags(any_store):
    m = Manifest((Entry(b"", EntryType.DIR, mode=0o755),), {"Cmd": ["sh"]})
    digest = objects.write_manifest(any_store, m)
    assert objects.read_manifest(any_store, digest) == m
    any_store.put_tag("team/app", "v1", digest)
    any_store.put_tag("team/app", "latest", digest)
    assert objects.resolve(any_store, "team/app:v1") == digest
    assert objects.resolve(any_store, "team/app") == digest
    assert objects.resolve(any_store, digest) == digest
    other = objects.write_manifest(any_store, Manifest((Entry(b"", EntryType.DIR, mode=0o700),)))
    any_store.put_tag("team/app", "v1", other)  # tags move
    assert any_store.get_tag("team/app", "v1") == other
    assert any_store.list_tags() == [("team/app", "latest", digest), ("team/app", "v1", other)]
    assert {m.digest for m in any_store.list_manifests()} == {digest, other}
    any_store.delete_manifest(other)
    assert {m.digest for m in any_store.list_manifests()} == {digest}


def test_leases(any_store):
    assert any_store.list_leases() == []
    any_store.put_lease("build-1", b"{}")
    any_store.put_lease("build-1", b'{"refreshed": 1}')
    any_store.put_lease("gc-2", b"{}")
    assert any_store.list_leases() == [("build-1", b'{"refreshed": 1}'), ("gc-2", b"{}")]
    any_store.delete_lease("build-1")
    assert [n for n, _ in any_store.list_leases()] == ["gc-2"]


def test_concurrent_puts_of_one_block(any_store):
    digest, frame = block.encode(b"z" * 200_000)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: any_store.put_block(digest, frame), range(16)))
    assert any(results)
    assert any_store.get_block(digest) == frame


def test_fetch_block_verifies(any_store):
    digest, frame = block.encode(b"content")
    wrong_digest, _ = block.encode(b"different")
    any_store.put_block(digest, frame)
    assert objects.fetch_block(any_store, digest, 7) == b"content"
    try:
        any_store.put_block(wrong_digest, frame)  # the wrong bytes under a name
    except LazyfsError:  # a store that verifies writes (the cache server) refuses, keeping nothing
        assert not any_store.has_block(wrong_digest)
        return
    with pytest.raises(LazyfsError):
        objects.fetch_block(any_store, wrong_digest)


def test_manifest_read_is_verified(any_store):
    m = Manifest((Entry(b"", EntryType.DIR, mode=0o755),))
    good = objects.write_manifest(any_store, m)
    other = objects.write_manifest(any_store, Manifest((Entry(b"", EntryType.DIR, mode=0o700),)))
    assert objects.read_manifest(any_store, good) == m
    try:
        any_store.put_manifest(block.encode(b"x")[0], any_store.get_manifest(other))  # wrong content
    except LazyfsError:  # refused by a verifying store
        with pytest.raises(ManifestNotFound):
            any_store.get_manifest(block.encode(b"x")[0])
        return
    with pytest.raises(DigestMismatch) as exc:
        objects.read_manifest(any_store, block.encode(b"x")[0])
    assert "manifest" in str(exc.value)


def test_large_object(any_store):
    """Frames past the multipart threshold (S3) and past one read buffer (HTTP) round-trip."""
    import os
    digest, frame = block.encode(os.urandom(12 * 1024 * 1024))
    assert any_store.put_block(digest, frame) is True
    assert any_store.block_size(digest) == len(frame)
    assert any_store.get_block(digest) == frame
    assert any_store.put_block(digest, frame) is False

"""One conformance suite for every BlockSource (where a mount reads from): a StoreReader over a
local store, a StoreReader over one real cache server, and a fleet of two real cache servers with
an origin. Only verified bytes come out; what is missing or wrong is a typed error, never bytes."""
from __future__ import annotations

import hashlib
from contextlib import ExitStack

import pytest

from cache_server.server import ServerThread
from lazyfs.errors import LazyfsError, NotFound
from lazyfs.format import block, manifest as mf
from lazyfs.source.fleet import Fleet, FleetOptions
from lazyfs.records import objects
from lazyfs.source.base import BlockSource
from lazyfs.store.http import HttpStore
from lazyfs.store.local import LocalStore
from lazyfs.source.reader import StoreReader


def _data(i: int, size: int = 40_000) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (size // 32)


@pytest.fixture(params=["store", "server", "fleet"])
def source(request, tmp_path):
    """(the BlockSource, the LocalStore behind it, where blocks are planted)."""
    origin = LocalStore(tmp_path / "origin")
    if request.param == "store":
        src = StoreReader(origin)
        yield src, origin
        src.close()
        return
    with ExitStack() as stack:
        servers = [stack.enter_context(ServerThread(origin, tmp_path / f"cache-{i}"))
                   for i in range(1 if request.param == "server" else 2)]
        if request.param == "server":
            src = StoreReader(HttpStore(servers[0].url), deadline=5)
        else:
            src = Fleet([s.url for s in servers], origin=LocalStore(tmp_path / "origin"),
                        options=FleetOptions(deadline=5))
        stack.callback(src.close)
        yield src, origin


def _plant(store: LocalStore, i: int) -> tuple[str, bytes]:
    data = _data(i)
    digest, frame = block.encode(data)
    store.put_block(digest, frame)
    return digest, data


def _plant_wrong(store: LocalStore, i: int) -> tuple[str, int]:
    """A well-formed frame stored under a digest its bytes do not hash to."""
    digest = block.encode(_data(i))[0]
    store.put_block(digest, block.encode(_data(i + 1000))[1])
    return digest, len(_data(i))


def test_is_a_block_source(source):
    assert isinstance(source[0], BlockSource)


def test_fetch_block_returns_verified_bytes_and_counts_them(source):
    src, origin = source
    digest, data = _plant(origin, 1)
    assert src.fetch_block(digest, len(data)) == data
    assert src.fetch_block(digest) == data
    s = src.stats.snapshot()
    assert s["block_gets"] == 2 and s["block_bytes"] == 2 * len(origin.get_block(digest))


def test_missing_block_is_not_found(source):
    src, _ = source
    with pytest.raises(NotFound):
        src.fetch_block(block.encode(b"never stored")[0])


def test_wrong_bytes_are_an_error_not_bytes(source):
    src, origin = source
    digest, size = _plant_wrong(origin, 2)
    with pytest.raises(LazyfsError):
        src.fetch_block(digest, size)
    good, data = _plant(origin, 3)
    with pytest.raises(LazyfsError):
        src.fetch_block(good, len(data) + 1)  # the manifest's size is checked too


def test_fetch_blocks_gives_each_block_once_with_its_bytes_or_its_error(source):
    src, origin = source
    good = [_plant(origin, i) for i in range(10, 16)]
    wrong = _plant_wrong(origin, 20)
    missing = (block.encode(b"absent")[0], 6)
    items = [(d, len(x)) for d, x in good] + [wrong, missing]
    results = list(src.fetch_blocks(items))
    assert sorted(d for d, _ in results) == sorted(d for d, _ in items)
    got = dict(results)
    for d, x in good:
        assert got[d] == x
    assert isinstance(got[wrong[0]], LazyfsError)
    assert isinstance(got[missing[0]], NotFound)


def test_tags_and_manifests(source):
    src, origin = source
    digest = objects.write_manifest(origin, mf.Manifest((mf.Entry(b"", mf.EntryType.DIR, mode=0o755),),
                                                        {"Env": ["A=1"]}, 1 << 20))
    origin.put_tag("conf/img", "1", digest)
    assert src.get_tag("conf/img", "1") == digest
    assert mf.decode_config(objects.read_manifest_bytes(src, digest)) == {"Env": ["A=1"]}


def test_a_lying_store_is_counted_for_single_and_batch_reads(tmp_path):
    """A store that hands out wrong bytes: both read paths refuse and count them."""
    origin = LocalStore(tmp_path / "origin")
    src = StoreReader(origin)
    digest, size = _plant_wrong(origin, 30)
    with pytest.raises(LazyfsError):
        src.fetch_block(digest, size)
    assert src.stats.wrong_bytes == 1
    assert isinstance(dict(src.fetch_blocks([(digest, size)]))[digest], LazyfsError)
    assert src.stats.wrong_bytes == 3  # the batch's frame, then the single retry's


@pytest.mark.parametrize("how", ["store", "server"])
def test_a_server_that_never_answers_fails_a_read_at_the_deadline(how):
    """--deadline holds for an HTTP store as for a fleet: EIO after it, not after the store's
    own timeouts and retries (minutes)."""
    import socket
    import time

    from lazyfs.errors import StoreUnavailable
    from lazyfs.source.spec import Source
    with socket.socket() as hole:  # accepts connections, never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        url = f"http://127.0.0.1:{hole.getsockname()[1]}"
        src = (Source(store=url, deadline=1.0) if how == "store" else Source(servers=(url,), deadline=1.0)).open()
        try:
            started = time.monotonic()
            with pytest.raises(LazyfsError) as failed:
                src.fetch_block("sha256:" + "1" * 64, 10)
            took = time.monotonic() - started
        finally:
            src.close()
    assert 0.9 <= took < 4, f"{took:.1f} s"
    if how == "store":
        assert isinstance(failed.value, StoreUnavailable) and "deadline" in str(failed.value)

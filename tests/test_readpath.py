"""The read path's core without root or FUSE: ImageIndex (chunk maps, link counts, stat) and
LazyOps (errno mapping, readahead and sibling decisions) against a fake cache."""
from __future__ import annotations

import errno
import hashlib
import logging
import stat

import pytest
from fuse import FuseOSError
from hypothesis import given, strategies as st

from lazyfs.cache.nodecache import CacheStats
from lazyfs.errors import BlockNotFound, DigestMismatch
from lazyfs.format.manifest import Chunk, Entry, EntryType, Manifest
from lazyfs.fs.fuseops import SIBLING_MAX_SIZE, LazyOps
from lazyfs.fs.index import ImageIndex


def _chunk(data: bytes) -> Chunk:
    return Chunk("sha256:" + hashlib.sha256(data).hexdigest(), len(data))


class FakeCache:
    """Blocks from a dict; records what readahead asked for; fails on demand."""

    def __init__(self, blocks: dict[str, bytes]):
        self.blocks = blocks
        self.stats = CacheStats()
        self.prefetched: list[list[tuple[str, int]]] = []
        self.fail: dict[str, Exception] = {}
        self.held: set[str] = set(blocks)  # what on_disk says the node has

    def on_disk(self, digest):
        return digest in self.held

    def read(self, digest, size, offset, length):
        if digest in self.fail:
            raise self.fail[digest]
        return self.blocks[digest][offset:offset + length]

    def prefetch(self, wanted):
        self.prefetched.append(list(wanted))


PARTS = [bytes([i]) * 1000 for i in range(1, 6)]  # a 5,000-byte file in 5 chunks
SMALL = [f"module {i}\n".encode() for i in range(4)]


def _image():
    big = Entry(b"lib/big.so", EntryType.REG, mode=0o755, size=5000,
                chunks=tuple(_chunk(p) for p in PARTS))
    entries = [Entry(b"", EntryType.DIR, mode=0o755), Entry(b"lib", EntryType.DIR, mode=0o755),
               big, Entry(b"lib/big-link", EntryType.HARDLINK, link=b"lib/big.so"),
               Entry(b"lib/sub", EntryType.DIR, mode=0o700),
               Entry(b"lib/link", EntryType.SYMLINK, mode=0o777, size=6, target=b"big.so"),
               Entry(b"pkg", EntryType.DIR, mode=0o755),
               Entry(b"pkg/huge.bin", EntryType.REG, mode=0o644, size=SIBLING_MAX_SIZE + 1,
                     chunks=(Chunk("sha256:" + "ab" * 32, SIBLING_MAX_SIZE + 1),)),
               Entry(b"dev", EntryType.DIR, mode=0o755),
               Entry(b"dev/null", EntryType.CHR, mode=0o666, rdev=(1, 3))]
    entries += [Entry(f"pkg/m{i}.py".encode(), EntryType.REG, mode=0o644, size=len(d),
                      chunks=(_chunk(d),)) for i, d in enumerate(SMALL)]
    blocks = {_chunk(d).digest: d for d in PARTS + SMALL}
    return ImageIndex(Manifest(tuple(entries), {}, 1000)), blocks


@pytest.fixture
def ops():
    index, blocks = _image()
    fetched = []
    o = LazyOps(index, FakeCache(blocks), readahead=2, fetch_batch=fetched.append)
    o.siblings_fetched = fetched
    return o


def test_link_counts_inodes_and_stat():
    index, _ = _image()
    big, link = index.lookup(b"lib/big.so"), index.lookup(b"lib/big-link")
    assert big is link and big.nlink == 2  # a hardlink shares its target's inode
    assert index.lookup(b"lib").nlink == 3  # ".", its entry in /, and sub's ".."
    assert index.lookup(b"").nlink == 5  # lib, pkg and dev
    s = index.stat(big)
    assert stat.S_ISREG(s["st_mode"]) and s["st_mode"] & 0o7777 == 0o755 and s["st_size"] == 5000
    assert index.stat(index.lookup(b"dev/null"))["st_rdev"] == 0x103
    assert index.total_size == 5000 + SIBLING_MAX_SIZE + 1 + sum(map(len, SMALL))
    assert index.children[index.lookup(b"").ino] == [b"lib", b"pkg", b"dev"]


@given(st.integers(0, 5200), st.integers(0, 6000))
def test_chunks_for_covers_exactly_the_range(offset, length):
    index, _ = _image()
    inode = index.lookup(b"lib/big.so")
    whole = b"".join(PARTS)
    got = b"".join(PARTS[[c.digest for c in inode.entry.chunks].index(c.digest)][inner:inner + n]
                   for c, inner, n in inode.chunks_for(offset, length))
    assert got == whole[offset:offset + length]


def test_chunks_after():
    inode = _image()[0].lookup(b"lib/big.so")
    assert [c.size for c in inode.chunks_after(1000, 2)] == [1000, 1000]
    assert inode.chunks_after(1000, 2)[0] == inode.entry.chunks[1]
    assert inode.chunks_after(1500, 9) == inode.entry.chunks[2:]
    assert inode.chunks_after(5000, 2) == ()


def test_reads_across_chunks(ops):
    assert ops.read("/lib/big.so", 1500, 500, None) == PARTS[0][500:] + PARTS[1]
    assert ops.read("/lib/big-link", 10, 4995, None) == PARTS[4][-5:]
    assert ops.read("/lib/big.so", 10, 5000, None) == b""
    assert ops.reads == 3 and ops.read_bytes == 1505


@pytest.mark.parametrize("call, code", [
    (lambda o: o.getattr("/nope"), errno.ENOENT),
    (lambda o: list(o.readdir("/lib/big.so", None)), errno.ENOTDIR),
    (lambda o: o.readlink("/lib/big.so"), errno.EINVAL),
    (lambda o: o.getxattr("/lib", "user.x"), errno.ENODATA),
    (lambda o: o.access("/lib", 2), errno.EROFS),
    (lambda o: o.unlink("/lib/big.so"), errno.EROFS),
    (lambda o: o.write("/lib/big.so", b"x", 0, None), errno.EROFS),
])
def test_errno_mapping(ops, call, code):
    with pytest.raises(FuseOSError) as info:
        call(ops)
    assert info.value.errno == code


@pytest.mark.parametrize("error", [BlockNotFound(_chunk(PARTS[1]).digest),
                                   DigestMismatch(_chunk(PARTS[1]).digest, "sha256:" + "0" * 64),
                                   OSError(errno.EIO, "disk")])
def test_a_block_that_cannot_be_had_is_eio_with_a_log_line(ops, caplog, error):
    ops.cache.fail[_chunk(PARTS[1]).digest] = error
    with caplog.at_level(logging.ERROR), pytest.raises(FuseOSError) as info:
        ops.read("/lib/big.so", 2000, 0, None)
    assert info.value.errno == errno.EIO
    assert "EIO reading /lib/big.so" in caplog.text
    if not isinstance(error, OSError):
        assert _chunk(PARTS[1]).digest in caplog.text  # the log names the block


def test_listing_a_directory_of_a_mount_whose_manifest_failed_is_eio(caplog):
    """Kernel path: the daemon answers the mount before the manifest loads; if it never does,
    listing a fan-out directory is EIO (a fault while listing, not fusepy's EINVAL)."""
    from lazyfs.errors import StoreUnavailable
    from lazyfs.fs.dataindex import DeferredIndex

    def fails():
        raise StoreUnavailable("the store went away")
    o = LazyOps(DeferredIndex(fails), FakeCache({}))
    with caplog.at_level(logging.ERROR), pytest.raises(FuseOSError) as info:
        o("readdir", "/00", None)
    assert info.value.errno == errno.EIO
    assert "the store went away" in caplog.text


def test_request_and_read_counts_lose_nothing_to_concurrent_threads(ops):
    """fusepy calls the adapter from many threads at once (nothreads=False): every request and
    read is counted. A count is read, added to and written back; another thread may run in
    between (the interpreter may switch at any bytecode): forced here, at each count."""
    import threading
    import time

    class Slow(int):  # a count whose addition lets other threads run
        def __add__(self, other):
            time.sleep(0.0001)
            return Slow(int(self) + other)

    class SlowDict(dict):
        def get(self, key, default=None):
            value = super().get(key, default)
            time.sleep(0.0001)
            return value if value is None else Slow(value)

    ops.ops, ops.reads, ops.read_bytes = SlowDict(), Slow(0), Slow(0)

    def work():
        for _ in range(100):
            ops("getattr", "/lib/big.so")
            ops("read", "/pkg/m1.py", 100, 0, None)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = ops.stats()
    assert s["requests"] == {"getattr": 800, "read": 800}
    assert s["reads"] == 800 and s["read_bytes"] == 800 * len(SMALL[1])


def test_readdir_readlink_and_xattrs(ops):
    names = [n if isinstance(n, str) else n[0] for n in ops.readdir("/lib", None)]
    assert names == [".", "..", "big.so", "big-link", "sub", "link"]
    assert ops.readlink("/lib/link") == "big.so"


def test_readahead_only_for_sequential_reads(ops):
    ops.read("/lib/big.so", 1000, 0, None)  # first read: nothing to follow yet
    assert ops.cache.prefetched == []
    ops.read("/lib/big.so", 1000, 1000, None)  # continues where the last ended
    assert ops.cache.prefetched == [[(c.digest, c.size) for c in _image()[0]
                                     .lookup(b"lib/big.so").entry.chunks[2:4]]]
    ops.read("/lib/big.so", 100, 4000, None)  # a jump: no readahead
    assert len(ops.cache.prefetched) == 1


def test_a_miss_in_a_large_file_batches_its_next_blocks(ops):
    """A library's page faults jump about: a read that must fetch its block asks, in one batch,
    for the next --readahead blocks too; a read the node can serve asks for nothing."""
    chunks = ops.index.lookup(b"lib/big.so").entry.chunks
    ops.read("/lib/big.so", 100, 0, None)  # on the node: nothing asked
    assert ops.siblings_fetched == []
    ops.cache.held -= {c.digest for c in chunks}
    ops.read("/lib/big.so", 100, 2100, None)  # a miss in chunk 2: chunks 3 and 4 come along
    assert ops.siblings_fetched == [[(c.digest, c.size) for c in chunks[3:5]]]
    ops.read("/lib/big.so", 100, 4950, None)  # a miss in the last chunk: nothing after it
    assert len(ops.siblings_fetched) == 1
    ops.siblings_fetched.clear()
    ops.readahead = 0  # --readahead 0: no batch either
    ops.read("/lib/big.so", 100, 1100, None)
    assert ops.siblings_fetched == [] and ops.cache.prefetched == []


def test_siblings_once_per_directory_small_files_only(ops):
    ops.read("/pkg/m0.py", 100, 0, None)
    assert ops.siblings_fetched == [[(_chunk(d).digest, len(d)) for d in SMALL]]  # not huge.bin
    ops.read("/pkg/m1.py", 100, 0, None)  # same directory: asked once only
    ops.read("/lib/big.so", 100, 0, None)  # lib/ has no single-block files: nothing to ask
    assert len(ops.siblings_fetched) == 1


def test_data_index_serves_every_object_and_finds_paths_on_first_use():
    from lazyfs.format import dataobj
    from lazyfs.fs.dataindex import DataIndex
    image, _ = _image()
    index = DataIndex(image.manifest)
    assert "_paths" not in vars(index)  # the image's paths wait until something asks
    regs = [e for e in image.manifest.entries if e.type == EntryType.REG and e.size]
    for e in regs:
        oid = dataobj.object_id(e.chunks)
        inode = index.lookup(dataobj.relpath(oid).encode())
        assert inode.entry is e and inode.nlink == image.by_path[e.path].nlink
        assert index.object_of(inode) == oid
        assert index.stat(inode)["st_size"] == e.size
    assert index.total_size == image.total_size and index.entry_count == image.entry_count
    assert index.lookup(b"lib/big.so") is None  # only the data namespace is looked up
    assert index.by_path.keys() == image.by_path.keys() and index.children == image.children
    listed = sum((index.listdir(d) for _, d in index.listdir(index.lookup(b""))), [])
    assert len(listed) == len({dataobj.object_id(e.chunks) for e in regs})


def test_a_fault_of_ours_reaches_the_reader_as_eio(ops, caplog):
    """Through the adapter's entry (what fusepy calls): an exception no layer expected is EIO,
    not fusepy's EINVAL; the answers themselves (ENOENT) pass as they are."""
    ops.cache.fail[_chunk(PARTS[1]).digest] = ValueError("a bug")
    with caplog.at_level(logging.ERROR), pytest.raises(FuseOSError) as info:
        ops("read", "/lib/big.so", 2000, 0, None)
    assert info.value.errno == errno.EIO and "a bug" in caplog.text
    with pytest.raises(FuseOSError) as info:
        ops("getattr", "/nope")
    assert info.value.errno == errno.ENOENT


def test_a_trace_that_cannot_be_written_fails_no_read(ops, tmp_path, caplog):
    trace = open(tmp_path / "trace.jsonl", "w")
    trace.close()  # (as a full disk would: every write fails)
    ops.trace = trace
    with caplog.at_level(logging.ERROR):
        assert ops("read", "/lib/big.so", 10, 0, None) == PARTS[0][:10]
        assert ops("read", "/lib/big.so", 10, 1000, None) == PARTS[1][:10]
    assert ops.trace is None and caplog.text.count("no more reads are traced") == 1

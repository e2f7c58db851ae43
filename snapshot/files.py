"""Moving a snapshot's files (CRIU images, the writable layer, captured output) to and from a
store as content-addressed zstd blocks. Two snapshots of one image share every identical block."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import xxhash

from lazyfs import paths
from lazyfs.cache.nodecache import NodeCache
from lazyfs.cache.prefetcher import Prefetcher
from lazyfs.errors import StoreUnavailable
from lazyfs.format import block
from lazyfs.format.manifest import DEFAULT_CHUNK_SIZE
from lazyfs.format.snapshot import SnapFile
from lazyfs.store.base import BlockStore

CHUNK = DEFAULT_CHUNK_SIZE  # snapshot files are cut as image files are
FETCH_THREADS = 8
# The next batch is asked for once 16 blocks of the one before are still to come: at 10 Gbit/s
# (8 + 8 restores each, alternating) 16 beat 8 and 32 (docs/snapshots-measured.md).
OVERLAP = 16
# A lazy restore's memory blocks are written into the node cache (for the next restore on the
# node) only once the restored process's faults go quiet, up to this much held back meanwhile:
# written as they streamed in, they took the page server's CPU and the disk when the process
# needed both (10 Gbit/s: first answer 1.32 against 1.85 s, 7 + 7; docs/snapshots-measured.md).
HOLD = 256 * 1024 * 1024


PAGE = 4096
PAGES_MIN, PAGES_AVG, PAGES_MAX = 64 * 1024, 256 * 1024, 1024 * 1024
# Memory blocks are stored at this zstd level, byte-shuffled where that is smaller: a restore streams
# them to a node whose link is the bound. On the bench's torch process, 7.3 % fewer bytes than
# level 3 as they are (5.6 % of it from the shuffle), inflated in 0.66 against 0.59 ns a byte with
# the unshuffle; encoding takes 3-13 ns a byte (floats the most), on ENCODERS threads
# (docs/snapshots-measured.md).
PAGE_LEVEL = 6
ENCODERS = 2


def _chunks(path: Path) -> Iterator[bytes]:
    if path.name.startswith("pages-") and path.name.endswith(".img"):
        yield from _page_chunks(path)
        return
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            yield data


def _page_chunks(path: Path) -> Iterator[bytes]:
    """CRIU page images are memory pages back to back: cut them where a page's own hash says so
    (content-defined, at page granularity), so the same memory in two snapshots gives the same
    blocks even when the rest of the address space moved (ASLR, a bigger heap)."""
    mask = PAGES_AVG // PAGE - 1
    current = bytearray()
    with open(path, "rb") as f:
        while data := f.read(4 * 1024 * 1024):
            view = memoryview(data)
            for off in range(0, len(data), PAGE):
                page = view[off:off + PAGE]
                current += page
                if len(current) >= PAGES_MAX or (
                        len(current) >= PAGES_MIN and xxhash.xxh64_intdigest(page) & mask == 0):
                    yield bytes(current)
                    current.clear()
    if current:
        yield bytes(current)


def publish(store: BlockStore, root: Path, names: list[str],
            progress: Callable[[int], None] | None = None) -> tuple[list[SnapFile], int, int]:
    """Store every file under ``root`` named in ``names``, streaming (memory stays at the store's
    upload window); returns (files, stored bytes new to the store, stored bytes in all).
    ``progress(n)``: n more bytes of the files encoded."""
    files: list[SnapFile] = []
    sizes: dict[str, int] = {}

    def frames(encoded_chunks):
        chunks = []
        for name, encoded in encoded_chunks:
            if encoded is None:  # the end of ``name``
                files.append(SnapFile(name, sum(n for _, n in chunks), tuple(chunks)))
                chunks = []
                continue
            digest, size, frame = encoded
            chunks.append((digest, size))
            if progress is not None:
                progress(size)
            if digest not in sizes:
                sizes[digest] = len(frame)
                yield digest, frame
    new = total = 0
    # closing(): a store that fails partway stops the encoders now, not when the error is let go.
    with contextlib.closing(_encoded(root, names)) as encoded_chunks:
        for digest, stored in store.put_blocks(frames(encoded_chunks)):
            total += sizes[digest]
            new += sizes[digest] if stored else 0
    return files, new, total


def _encode(data: bytes, pages: bool) -> tuple[str, int, bytes]:
    if pages:
        digest, frame = block.encode(data, PAGE_LEVEL, shuffle=True)
    else:
        digest, frame = block.encode(data)
    return digest, len(data), frame


def _encoded(root: Path, names: list[str]) -> Iterator[tuple[str, tuple[str, int, bytes] | None]]:
    """(name, (digest, size, frame)) for each chunk of each file in order, then (name, None) at
    the file's end; ENCODERS chunks compress at once (zstd releases the GIL), a few held ahead."""
    pool = ThreadPoolExecutor(ENCODERS, thread_name_prefix="snapshot-encode")
    try:
        ahead: deque = deque()
        for name in names:
            pages = is_pages(name)
            for data in _chunks(root / name):
                ahead.append((name, pool.submit(_encode, data, pages)))
                while len(ahead) > 2 * ENCODERS:
                    yield _next(ahead)
            ahead.append((name, None))
        while ahead:
            yield _next(ahead)
    finally:
        # (a failed encode, or a store that failed the upload: what is queued is not encoded)
        pool.shutdown(cancel_futures=True)


def _next(ahead: deque):
    name, future = ahead.popleft()
    return name, None if future is None else future.result()


class BlockFetcher:
    """``fetcher(digest, size) -> bytes``, verified, for a snapshot's blocks. From a remote store
    or fleet they go through the node cache, so the next restore on this node reads them
    locally; from a local store that would only copy them twice."""

    def __init__(self, source, cache_dir: str | None, reader):
        self.fetch_block = reader.fetch_block
        self.fetch_blocks = reader.fetch_blocks
        self.cache = None
        self.streams: list[Prefetcher] = []
        if source.remote():
            self.cache = NodeCache(cache_dir or paths.default_cache_dir(), reader.fetch_block)
        # Only where one request answers many blocks: S3 would be asked one block after
        # another, slower than the fetch threads' parallel reads.
        self.batches = self.cache is not None and source.batches()

    def __call__(self, digest: str, size: int) -> bytes:
        if self.cache is None:
            return self.fetch_block(digest, size)
        return self.cache.read(digest, size, 0, size)

    def stream(self, blocks: list[tuple[str, int]], on_block=None) -> bool:
        """Start bringing ``blocks`` (digest, size) in, in this order, in batch requests of 64
        (from a fleet or an HTTP store; anything else is read block by block): a read of one of them
        then waits for the batch that carries it instead of asking on its own. One request per
        block cost the cache server and the node's CPU more than the bytes did at 10 Gbit/s
        (docs/snapshots-measured.md). ``on_block(digest, data)``: each block as it lands, verified.
        Whether they stream (else each read fetches its own)."""
        if not (self.batches and blocks):
            return False
        self.streams.append(Prefetcher(self.cache, self.fetch_blocks, blocks, quiet=True,
                                       unchecked=True, streams=2, overlap=OVERLAP,
                                       on_block=on_block).start())
        return True

    def hold(self, digests) -> None:
        """Write these blocks (a restore's memory) into the node cache only at release_held()
        (or close()), up to HOLD bytes; the rest as they come."""
        if self.cache is not None:
            self.cache.hold(digests, HOLD)

    def release_held(self) -> None:
        if self.cache is not None:
            self.cache.release_held()

    def streamed(self) -> dict:
        """Blocks the batch streams brought in, and the batch requests that carried them."""
        stats = [s.stats.snapshot() for s in self.streams]
        return {"batched_blocks": sum(s["fetched"] for s in stats),
                "batches": sum(s["batches"] for s in stats)}

    def close(self, until: threading.Event | None = None) -> None:
        """Stop streaming, land what is written behind, and end the cache's writer threads.
        ``until``: first let the streams finish, unless (or until) that is set."""
        if until is not None:
            for stream in self.streams:
                while not until.is_set() and not stream.wait(0.1):
                    pass
        for stream in self.streams:
            stream.stop()
        deadline = time.monotonic() + 30  # (a batch in flight ends at the source's deadline)
        for stream in self.streams:
            stream.wait(max(0.0, deadline - time.monotonic()))
        if self.cache is not None:
            self.cache.close()


def is_pages(name: str) -> bool:
    """A CRIU pages file (memory contents), as opposed to the small images that describe it.
    Only one CRIU reads: right in criu/ (the page server knows them by their base name, and one
    further down would stand in for it)."""
    directory, _, base = name.rpartition("/")
    return directory == "criu" and base.startswith("pages-") and base.endswith(".img")


def fetch(fetch_block, files, root: Path, only: dict[str, list[tuple[int, int]]] | None = None,
          tick=None) -> int:
    """Write each file under ``root`` from verified blocks (``fetch_block(digest, size)`` must
    verify, as Fleet.fetch_block and CountingStore.fetch_block do). Returns bytes written.
    ``only``: for the files it names, just the blocks overlapping these (offset, length) ranges;
    the rest of such a file stays a hole (a lazy restore's pages files). ``tick(n)``: n more
    bytes written (progress)."""
    jobs = []
    for f in files:
        target = root / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, f.size)
        os.close(fd)
        ranges = sorted(only[f.name]) if only is not None and f.name in only else None
        offset = r = 0
        for digest, size in f.chunks:
            while ranges and r < len(ranges) and sum(ranges[r]) <= offset:
                r += 1  # ranges that end before this block
            if ranges is None or (r < len(ranges) and ranges[r][0] < offset + size):
                jobs.append((target, offset, digest, size))
            offset += size

    def one(job) -> int:
        target, offset, digest, size = job
        data = fetch_block(digest, size)
        if len(data) != size:
            raise StoreUnavailable(f"snapshot block {digest}: got {len(data)} bytes, want {size}")
        fd = os.open(target, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        if tick is not None:
            tick(size)
        return size
    if isinstance(fetch_block, BlockFetcher):  # in batch requests, which the threads wait for
        fetch_block.stream([(digest, size) for _, _, digest, size in jobs])
    with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="snap-fetch") as pool:
        return sum(pool.map(one, jobs))

"""Cutting file contents into blocks and staging them until the build is known to be good.

Blocks are written to the build's own temp directory first; only when every layer has been read and
verified are the blocks the final tree still references copied into the store. A failed build
therefore leaves nothing in the store, and content deleted by a later layer is never uploaded.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from lazyfs.errors import ImageSourceError
from lazyfs.format import block
from lazyfs.format.manifest import DEFAULT_CHUNK_SIZE, Chunk
from lazyfs.store.base import BlockStore

_READ = 1 << 20


@dataclass
class CommitStats:
    blocks: int = 0  # distinct blocks the image references
    uploaded: int = 0  # of those, new to the store
    uploaded_bytes: int = 0  # encoded bytes written
    raw_bytes: int = 0  # uncompressed bytes of the distinct blocks


class BlockStager:
    def __init__(self, tmp_dir: Path, store: BlockStore, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 level: int = block.DEFAULT_LEVEL, threads: int = 2, shuffle: bool = False):
        if not 0 < chunk_size <= block.MAX_BLOCK_SIZE:
            raise ValueError(f"chunk size must be 1..{block.MAX_BLOCK_SIZE}")
        self.dir = tmp_dir
        self.store = store
        self.chunk_size = chunk_size
        self.level = level
        self.shuffle = shuffle  # try the byte shuffle on each block (docs/format.md §2.1)
        self.staged: dict[str, int] = {}  # digest -> raw size (staged here, or already in store)
        self.in_store: set[str] = set()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="compress")
        self._pending: list[Future] = []

    def add(self, stream: BinaryIO, size: int, name: str) -> tuple[Chunk, ...]:
        """Read exactly ``size`` bytes of one file and return its chunk list."""
        chunks = []
        left = size
        while left:
            want = min(self.chunk_size, left)
            data = _read_exact(stream, want, name)
            left -= want
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            chunks.append(Chunk(digest, want))
            if digest not in self.staged:
                self.staged[digest] = want
                if self.store.has_block(digest):
                    self.in_store.add(digest)  # identical content already stored: never recompressed
                else:
                    self._submit(digest, data)
        return tuple(chunks)

    def _submit(self, digest: str, data: bytes) -> None:
        # zstd and sha256 release the GIL, so compression overlaps with reading the next layer bytes.
        self._pending.append(self._pool.submit(self._write, digest, data))
        if len(self._pending) > 32:
            self._drain(16)

    def _write(self, digest: str, data: bytes) -> None:
        _, frame = block.encode(data, self.level, shuffle=self.shuffle)
        path = self.dir / digest[7:]
        with open(path, "wb") as f:
            f.write(frame)

    def _drain(self, keep: int = 0) -> None:
        while len(self._pending) > keep:
            self._pending.pop(0).result()

    def commit(self, digests: Iterable[str], progress: Callable[[int], None] | None = None) -> CommitStats:
        """Put the referenced blocks the store lacks into it (blocks first; manifests after)."""
        self._drain()
        stats = CommitStats()
        wanted = sorted(digests)
        for digest in wanted:
            stats.blocks += 1
            stats.raw_bytes += self.staged[digest]
            if digest in self.in_store and progress:
                progress(self.staged[digest])
        encoded: dict[str, int] = {}

        def frames():
            for d in wanted:
                if d not in self.in_store:
                    frame = (self.dir / d[7:]).read_bytes()
                    encoded[d] = len(frame)
                    yield d, frame
        for digest, stored in self.store.put_blocks(frames()):
            if stored:
                stats.uploaded += 1
                stats.uploaded_bytes += encoded[digest]
            if progress:
                progress(self.staged[digest])
        return stats

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for f in self._pending:
            if f.done() and not f.cancelled():
                f.exception()
        self._pending.clear()


def _read_exact(stream: BinaryIO, n: int, name: str) -> bytes:
    parts = []
    left = n
    while left:
        data = stream.read(min(left, _READ))
        if not data:
            raise ImageSourceError(f"{name}: file content ends early (archive truncated?)")
        parts.append(data)
        left -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


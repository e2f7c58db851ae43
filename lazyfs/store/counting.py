"""A BlockStore wrapper that counts what passes through it (the laziness tests and benchmarks
read it). It verifies nothing: lazyfs.source.reader.StoreReader is the verifying reader on top."""
from __future__ import annotations

from lazyfs.store.base import BlockStore, StoreStats


class CountingStore:
    def __init__(self, inner: BlockStore, stats: StoreStats | None = None):
        self.inner = inner
        self.stats = stats or StoreStats()
        self.url = inner.url

    def get_block(self, digest: str) -> bytes:
        data = self.inner.get_block(digest)
        self.stats.add(block_gets=1, block_bytes=len(data))
        return data

    def get_blocks(self, wanted: list[str]):
        return counted_frames(self.inner.get_blocks(wanted), self.stats)

    def get_manifest(self, digest: str) -> bytes:
        data = self.inner.get_manifest(digest)
        self.stats.add(manifest_gets=1, manifest_bytes=len(data))
        return data

    def put_block(self, digest: str, frame: bytes) -> bool:
        stored = self.inner.put_block(digest, frame)
        if stored:
            self.stats.add(puts=1, put_bytes=len(frame))
        return stored

    def put_blocks(self, items):
        sizes: dict[str, int] = {}

        def sized():
            for digest, frame in items:
                sizes[digest] = len(frame)
                yield digest, frame
        for digest, stored in self.inner.put_blocks(sized()):
            if stored:
                self.stats.add(puts=1, put_bytes=sizes[digest])
            yield digest, stored

    def put_manifest(self, digest: str, frame: bytes) -> bool:
        stored = self.inner.put_manifest(digest, frame)
        if stored:
            self.stats.add(puts=1, put_bytes=len(frame))
        return stored

    def __getattr__(self, name):
        # Everything not counted (has, size, tags, listing) goes straight through.
        return getattr(self.inner, name)


def counted_frames(frames, stats):
    """Pass a batch read's (digest, frame) pairs through, counting delivered blocks in ``stats``
    (block_gets, block_bytes) as single gets are counted."""
    for digest, frame in frames:
        if frame is not None:
            stats.add(block_gets=1, block_bytes=len(frame))
        yield digest, frame

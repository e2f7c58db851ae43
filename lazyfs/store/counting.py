"""A store wrapper that counts what passes through it (the laziness tests and benchmarks read it)."""
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

    def fetch_block(self, digest: str, size: int | None = None) -> bytes:
        """Verified block bytes (the node cache's fetch function)."""
        from lazyfs.store.objects import fetch_block
        return fetch_block(self, digest, size)

    def fetch_blocks(self, items: list[tuple[str, int]]):
        """Verified bytes of many blocks (the prefetcher's fetch): one batch request where the
        store has one (a cache server), else one read per block."""
        from lazyfs.store.objects import counted_frames, fetch_blocks
        batch = getattr(self.inner, "get_blocks", None)
        counted = (lambda wanted: counted_frames(batch(wanted), self.stats)) if batch else None
        return fetch_blocks(items, self.fetch_block, counted)

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

"""StoreReader: the BlockSource over one BlockStore (a directory, S3, one cache server).

Every frame it hands on was verified against its digest (lazyfs.records.objects.verify), single
reads and batch reads alike; wrong bytes are counted (``stats.wrong_bytes``) and logged, never
served. The fleet (lazyfs.source.fleet.Fleet) is the other BlockSource, over several servers.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from typing import Iterator

from lazyfs.errors import FormatError, IntegrityError, StoreError, StoreUnavailable
from lazyfs.records import objects
from lazyfs.store.base import BlockStore
from lazyfs.store.counting import CountingStore

log = logging.getLogger("lazyfs.store")
READ_THREADS = 16  # block reads of one remote store at once (a mount's readers and prefetches)


class StoreReader:
    def __init__(self, store: BlockStore, deadline: float | None = None):
        """``deadline``: seconds a block read may take in all, its store's own retries
        included, before it fails (a server that accepts and never answers, or trickles); None
        for a store that cannot hang (a directory)."""
        self.store = CountingStore(store)
        self.stats = self.store.stats
        self.url = store.url
        self.deadline = deadline
        # Threads started as reads need them, and ended by close() (the page server forks after).
        self._reads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="store-read") if deadline else None

    def get_tag(self, name: str, tag: str) -> str:
        return self.store.get_tag(name, tag)

    def get_manifest(self, digest: str) -> bytes:
        return self.store.get_manifest(digest)

    def verified_manifest(self, digest: str) -> bytes:
        return objects.verify(objects.MANIFEST, digest, self.store.get_manifest(digest))

    def fetch_block(self, digest: str, size: int | None = None) -> bytes:
        if self._reads is None:
            return self._fetch_block(digest, size)
        answer = self._reads.submit(self._fetch_block, digest, size)
        try:
            return answer.result(self.deadline)
        except FutureTimeout:  # (its thread ends with the store's own timeout)
            answer.cancel()
            self.stats.add(errors=1)
            raise StoreUnavailable(f"{self.url}: block {digest}: no answer within the "
                                   f"{self.deadline:g} s deadline") from None

    def _fetch_block(self, digest: str, size: int | None) -> bytes:
        try:
            return objects.fetch_block(self.store, digest, size)
        except (IntegrityError, FormatError) as exc:
            self._rejected(digest, exc)
            raise

    def fetch_blocks(self, items: list[tuple[str, int]]) -> Iterator[tuple[str, bytes | Exception]]:
        return objects.fetch_blocks(items, self.fetch_block, self.store.get_blocks, self._rejected)

    def contribute_profile(self, image_digest: str, start, workload: str | None) -> dict:
        """Hand one start's profile to the cache server this store is (it merges it: lazyfs.
        profiles.contribute); nodes never write a store themselves."""
        from lazyfs.format import profile as proffmt
        inner = self.store.inner
        if not hasattr(inner, "contribute_profile"):
            raise StoreError(f"{self.url} takes no startup profiles from nodes (only cache servers do)")
        return inner.contribute_profile(image_digest, workload, proffmt.encode(start))

    def _rejected(self, digest: str, exc: Exception) -> None:
        self.stats.add(wrong_bytes=1)
        log.error("%s: wrong bytes for block %s: %s", self.url, digest, exc)

    def close(self) -> None:
        if self._reads is not None:
            self._reads.shutdown(wait=False, cancel_futures=True)
        self.store.close()

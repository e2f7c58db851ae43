"""StoreReader: the BlockSource over one BlockStore (a directory, S3, one cache server).

Every frame it hands on was verified against its digest (lazyfs.records.objects.verify), single
reads and batch reads alike; wrong bytes are counted (``stats.wrong_bytes``) and logged, never
served. The fleet (lazyfs.source.fleet.Fleet) is the other BlockSource, over several servers.
"""
from __future__ import annotations

import logging
from typing import Iterator

from lazyfs.errors import FormatError, IntegrityError, StoreError
from lazyfs.records import objects
from lazyfs.store.base import BlockStore
from lazyfs.store.counting import CountingStore

log = logging.getLogger("lazyfs.store")


class StoreReader:
    def __init__(self, store: BlockStore):
        self.store = CountingStore(store)
        self.stats = self.store.stats
        self.url = store.url

    def get_tag(self, name: str, tag: str) -> str:
        return self.store.get_tag(name, tag)

    def get_manifest(self, digest: str) -> bytes:
        return self.store.get_manifest(digest)

    def verified_manifest(self, digest: str) -> bytes:
        return objects.verify(objects.MANIFEST, digest, self.store.get_manifest(digest))

    def fetch_block(self, digest: str, size: int | None = None) -> bytes:
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
        self.store.close()

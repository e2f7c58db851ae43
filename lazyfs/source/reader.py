"""StoreReader: the BlockSource over one BlockStore (a directory, S3, one cache server).

Every frame it hands on was verified against its digest (lazyfs.records.objects.verify), single
reads and batch reads alike; wrong bytes are counted (``stats.wrong_bytes``) and logged, never
served. The fleet (lazyfs.source.fleet.Fleet) is the other BlockSource, over several servers.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import Iterator

from lazyfs.errors import WRONG_BYTES, StoreError, StoreUnavailable
from lazyfs.records import objects
from lazyfs.store.base import BlockStore
from lazyfs.store.counting import CountingStore

log = logging.getLogger("lazyfs.store")
MAX_ABANDONED = 64  # reads left waiting on a store past their deadline, before reads fail at once


class StoreReader:
    def __init__(self, store: BlockStore, deadline: float | None = None):
        """``deadline``: seconds a block read may take in all, its store's own retries
        included, before it fails (a server that accepts and never answers, or trickles); None
        for a store that cannot hang (a directory)."""
        self.store = CountingStore(store)
        self.stats = self.store.stats
        self.url = store.url
        self.deadline = deadline
        self._lock = threading.Lock()
        self._abandoned = 0  # reads past their deadline whose threads still wait on the store

    def get_tag(self, name: str, tag: str) -> str:
        return self.store.get_tag(name, tag)

    def get_manifest(self, digest: str) -> bytes:
        return self.store.get_manifest(digest)

    def verified_manifest(self, digest: str) -> bytes:
        return objects.verify(objects.MANIFEST, digest, self.store.get_manifest(digest))

    def fetch_block(self, digest: str, size: int | None = None) -> bytes:
        if self.deadline is None:
            return self._fetch_block(digest, size)
        # A thread per read, not a pool: the deadline counts from the read's own start, and
        # reads stuck on the store hold threads of their own, not places in a queue.
        with self._lock:
            if self._abandoned >= MAX_ABANDONED:
                raise StoreUnavailable(f"{self.url}: block {digest}: {self._abandoned} reads are "
                                       f"still waiting on it past their deadline")
        answer: Future = Future()

        def read() -> None:
            try:
                answer.set_result(self._fetch_block(digest, size))
            except BaseException as exc:  # handed to the caller (or dropped, if it left)
                answer.set_exception(exc)
        try:
            threading.Thread(target=read, name="store-read", daemon=True).start()
        except RuntimeError:  # no thread to be had: read here, without the deadline
            return self._fetch_block(digest, size)
        try:
            return answer.result(self.deadline)
        except FutureTimeout:
            with self._lock:
                self._abandoned += 1
            answer.add_done_callback(self._let_go)  # (at once, if it ended meanwhile)
            self.stats.add(errors=1)
            raise StoreUnavailable(f"{self.url}: block {digest}: no answer within the "
                                   f"{self.deadline:g} s deadline") from None

    def _let_go(self, _answer: Future) -> None:
        with self._lock:
            self._abandoned -= 1

    def _fetch_block(self, digest: str, size: int | None) -> bytes:
        try:
            return objects.fetch_block(self.store, digest, size)
        except WRONG_BYTES as exc:
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


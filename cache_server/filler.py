"""Filling the disk cache from the origin store: single-flight, verified, off the event loop.

The origin is any BlockStore; its calls block (boto3, file I/O), so they run in a thread pool.
Concurrent requests for one missing object share one origin fetch (and one verification of a
cache file left by a previous run). Nothing enters the cache or reaches a client before its
digest checks out.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from cache_server.diskcache import FILE_ERRORS, DiskCache
from cache_server.metrics import Metrics
from lazyfs.errors import FormatError, IntegrityError, LazyfsError, NotCached, NotFound, StoreUnavailable
from lazyfs.records import objects
from lazyfs.store.base import BlockStore

log = logging.getLogger("lazyfs.server.fill")


# The server's kinds are its routes' and its disk cache's directories (plural); each is one kind
# of object (lazyfs.records.objects).
OBJECT_KIND = {"blocks": objects.BLOCK, "manifests": objects.MANIFEST}


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def verify(kind: str, digest: str, frame: bytes) -> None:
    """Raise IntegrityError/FormatError unless ``frame`` holds the object named ``digest``: the
    check every client makes too (lazyfs.records.objects.verify)."""
    objects.verify(OBJECT_KIND[kind], digest, frame)


class Filler:
    def __init__(self, origin: BlockStore, cache: DiskCache, metrics: Metrics, threads: int = 32):
        self.origin = origin
        self.cache = cache
        self.metrics = metrics
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="origin")
        self._inflight: dict[tuple, asyncio.Future] = {}

    async def call(self, fn, *args):
        """Run a blocking store call in the pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def read(self, path: str) -> bytes:
        """A cached file's bytes, read off the event loop (a big frame must not stall it)."""
        return await self.call(_read_file, path)

    async def obtain(self, kind: str, digest: str, fill: bool = True) -> tuple[str | None, bytes | None]:
        """(path of the cached frame, None), the entry pinned so no insert evicts it before it
        is sent: the caller unpins it (DiskCache.unpin). Or (None, frame) when the frame is not
        in the cache (too big for it, or evicted again by other inserts before this caller
        resumed: then the bytes in hand serve it). ``fill=False``: NotCached rather than ask
        the origin (a cache file is still verified first)."""
        found = self.cache.lookup(kind, digest)
        if found:
            path, verified = found
            if (self._intact(kind, digest, path) if verified else
                    await self._single(("verify", kind, digest), self._verify_file, kind, digest, path)):
                if self._pin(kind, digest):  # an await ago it was there; is it still?
                    self.metrics.hit()
                    return path, None
        if not fill:
            raise NotCached(f"{kind[:-1]} {digest} is not cached here")
        self.metrics.miss()
        path, frame = await self._single((kind, digest), self._fill, kind, digest)
        if path is not None and self._pin(kind, digest):
            return path, None
        return None, frame

    def _pin(self, kind: str, digest: str) -> bool:
        """Pin the entry if it is (still) cached; no await may come between this and use."""
        if self.cache.size(kind, digest) is None:
            return False
        self.cache.pin(kind, digest)
        return True

    async def _single(self, key: tuple, fn, *args):
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(fn(*args))
            self._inflight[key] = fut
            fut.add_done_callback(lambda _f, k=key: self._inflight.pop(k, None))
        # A client that goes away must not cancel the fetch others are waiting for.
        return await asyncio.shield(fut)

    def _intact(self, kind: str, digest: str, path: str) -> bool:
        """A verified entry's file still there at its size (one stat: removed or cut short since
        it was verified, it would go out as another frame); dropped if not."""
        try:
            if os.stat(path).st_size == self.cache.size(kind, digest):
                return True
        except OSError as exc:
            if exc.errno not in FILE_ERRORS:
                raise StoreUnavailable(f"cannot read the cache file of {digest}: {exc.strerror}") from None
        self.drop_damaged(kind, digest)
        return False

    async def _verify_file(self, kind: str, digest: str, path: str) -> bool:
        def check() -> bool:
            try:
                with open(path, "rb") as f:
                    verify(kind, digest, f.read())
                return True
            except (IntegrityError, FormatError):
                return False
            except OSError as exc:  # gone or unreadable: the file's fault; anything else is not
                if exc.errno in FILE_ERRORS:
                    return False
                raise StoreUnavailable(f"cannot read the cache file of {digest}: {exc.strerror}") from None
        if await self.call(check):
            self.cache.mark_verified(kind, digest)
            return True
        self.drop_damaged(kind, digest)
        return False

    def drop_damaged(self, kind: str, digest: str) -> None:
        if self.cache.drop(kind, digest, corrupt=True):  # (two answers may find one damage)
            self.metrics.verify_failures.labels("cache").inc()

    def _fetch(self, kind: str, digest: str) -> bytes:
        """The origin's frame, verified, in one job of the pool: as two, each fetched frame
        would wait in memory behind every fill queued meanwhile before it was checked."""
        get = self.origin.get_block if kind == "blocks" else self.origin.get_manifest
        self.metrics.origin_fetches.labels(kind).inc()
        started = time.monotonic()
        try:
            frame = get(digest)
        except NotFound:
            raise
        except LazyfsError as exc:
            self.metrics.origin_errors.inc()
            log.error("origin %s: GET %s %s failed: %s", self.origin.url, kind, digest, exc)
            raise
        finally:
            self.metrics.origin_latency.observe(time.monotonic() - started)
        self.metrics.origin_bytes.inc(len(frame))
        try:
            verify(kind, digest, frame)
        except (IntegrityError, FormatError) as exc:
            self.metrics.verify_failures.labels("origin").inc()
            log.error("origin %s holds a bad %s %s: %s", self.origin.url, kind, digest, exc)
            raise
        return frame

    async def _fill(self, kind: str, digest: str) -> tuple[str | None, bytes | None]:
        frame = await self.call(self._fetch, kind, digest)
        path = self.cache.insert(kind, digest, frame)
        self.metrics.cache_state(self.cache)
        return path, frame  # the frame too: waiters resume later, when it may be evicted

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

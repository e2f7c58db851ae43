"""Whole data objects from verified blocks: how a file of several chunks becomes kernel-served.

On the kernel path (lazyfs.fs.kernel) a one-chunk file is served from the node cache's block file
as soon as the node holds it, but a file of several chunks needs its object, the whole file as one
plain file in ``objects/``. The completer writes it once the node holds every chunk, from bytes
NodeCache.read has verified, through a temp file, fsync and rename, so the name never holds a
partial or unverified object. overlayfs binds a file to its data layer when the file is first
opened, so the next mount (or the next lookup after the kernel forgot the file) serves it from
local disk.

With ``background`` it also fetches the chunks a start did not read of every file it read part of,
one chunk at a time and only after demand reads have been quiet for ``idle`` seconds, so it never
competes with a start (what SOCI and Nydus users ask for as background fetch).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lazyfs.cache import cap, layout
from lazyfs.cache.nodecache import NodeCache
from lazyfs.counters import Counters
from lazyfs.errors import LazyfsError
from lazyfs.format import dataobj
from lazyfs.format.manifest import Chunk
from lazyfs.fsutil import atomic_write_parts
from lazyfs.source import defaults

log = logging.getLogger("lazyfs.cache")
RECHECK = 1.0  # seconds between looks at files that were read but are not complete yet


@dataclass
class CompleterStats(Counters):
    objects_written: int = 0
    object_bytes: int = 0
    background_blocks: int = 0  # chunks fetched by background completion, not by a read
    background_bytes: int = 0
    errors: int = 0


class Completer:
    def __init__(self, cache: NodeCache, objects_dir: str | os.PathLike, background: bool = False,
                 idle: float = defaults.COMPLETE_IDLE):
        self.cache, self.root = cache, Path(objects_dir)
        self.background, self.idle = background, idle
        self.stats = CompleterStats()
        self._touched: dict[str, tuple[Chunk, ...]] = {}  # read, not yet complete
        self._done: set[str] = set()
        self._last_read = time.monotonic()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="lazyfs-complete", daemon=True)

    def start(self) -> "Completer":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()

    def path(self, oid: str) -> Path:
        return self.root / dataobj.relpath(oid)

    def read(self, oid: str, chunks: tuple[Chunk, ...]) -> None:
        """A demand read of the object's file happened (called on every read: kept cheap)."""
        self._last_read = time.monotonic()
        if oid in self._done or oid in self._touched or dataobj.is_block(chunks):
            return
        with self._cond:
            self._touched[oid] = chunks
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait(RECHECK)
                if self._stop:
                    return
                pending = list(self._touched.items())
            for oid, chunks in pending:
                if self._stop:
                    return
                try:
                    if self._complete(oid, chunks):
                        with self._cond:
                            self._touched.pop(oid, None)
                            self._done.add(oid)
                except (LazyfsError, OSError) as exc:
                    # The reads themselves report a bad block; here it only means no object yet.
                    self.stats.add(errors=1)
                    log.warning("cannot complete object %s: %s", oid, exc)
                    with self._cond:
                        self._touched.pop(oid, None)

    def _complete(self, oid: str, chunks: tuple[Chunk, ...]) -> bool:
        """Write the object if the node holds (or, in background mode, has now fetched) every
        chunk; False if it must wait for more reads."""
        if self.path(oid).exists():
            return True
        size = sum(c.size for c in chunks)
        if cap.larger_than_cap(size, self.cache.cap_bytes):
            # Never written (lazyfs.cache.cap.room refuses it): nothing to fetch for it either;
            # the file stays on FUSE.
            log.info("object %s (%d bytes) is larger than the node cache's cap (%d bytes): not "
                     "completed", oid, size, self.cache.cap_bytes)
            return True
        for c in chunks:
            if self.cache.on_disk(c.digest):
                continue
            if not self.background:
                return False
            if not self._quiet():
                return False  # a start is reading: try again later
            # Not a read's miss: counted with the prefetches, out of the demand misses and the
            # time reads waited on them.
            self.cache.locate(c.digest, c.size, prefetch=True)
            self.stats.add(background_blocks=1, background_bytes=c.size)
        self._write(oid, chunks)
        return True

    def _quiet(self) -> bool:
        """Wait (bounded by stop) until demand reads have paused for ``idle`` seconds."""
        while not self._stop:
            wait = self.idle - (time.monotonic() - self._last_read)
            if wait <= 0:
                return True
            time.sleep(min(wait, 0.5))
        return False

    def _write(self, oid: str, chunks: tuple[Chunk, ...]) -> None:
        dest = self.path(oid)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # NodeCache.read hands out only bytes that match the digest.
        with self.cache.room(sum(c.size for c in chunks)) as rename:
            atomic_write_parts(dest, (self.cache.read(c.digest, c.size, 0, c.size) for c in chunks),
                               layout.tmp_dir(self.cache.root), mode=0o444, rename=rename)
        size = sum(c.size for c in chunks)
        self.stats.add(objects_written=1, object_bytes=size)
        log.info("object %s complete (%d chunks, %d bytes): served by the kernel from the next "
                 "mount on", oid, len(chunks), size)

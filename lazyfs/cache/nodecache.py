"""A directory of verified, decompressed blocks, shared by all images (and mounts) on a node.

The fetch function is injected (it returns a block's encoded frame), so the cache knows nothing of
stores or networks, and tests and benchmarks read the same counters. Concurrent misses for one
digest make one fetch (single-flight). Blocks enter the cache only after their digest checks out,
via temp file + rename, and each cached file is re-hashed the first time a process uses it, so a
file damaged on disk (power cut, bit rot) is dropped and fetched again rather than served.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lazyfs.counters import Counters
from lazyfs.errors import LazyfsError, StoreUnavailable
from lazyfs.format import block
from lazyfs.format import digest as digests

log = logging.getLogger("lazyfs.cache")
MEMORY_FALLBACK = 64 * 1024 * 1024
STALE_TEMP_SECONDS = 600


@dataclass
class CacheStats(Counters):
    hits: int = 0
    misses: int = 0  # fetches from the store
    fetched_bytes: int = 0  # encoded bytes the fetches returned
    fetched_raw_bytes: int = 0
    dropped_corrupt: int = 0
    errors: int = 0


class NodeCache:
    def __init__(self, root: str | os.PathLike, fetch: Callable[[str], bytes]):
        self.root = Path(root)
        self.fetch = fetch
        self.stats = CacheStats()
        self._verified: set[str] = set()
        self._inflight: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        # Verified blocks that could not be written to disk (cache disk full): served from memory.
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._memory_bytes = 0
        (self.root / "blocks").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        self._sweep_temp()

    def _sweep_temp(self) -> None:
        """Drop temp files a crashed process left. The cache is shared, so only old ones: a fresh
        one may belong to another daemon's write in progress."""
        cutoff = time.time() - STALE_TEMP_SECONDS
        for entry in os.scandir(self.root / "tmp"):
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass

    def path(self, digest: str) -> str:
        hexd = digests.hex_part(digest)
        return os.path.join(self.root, "blocks", hexd[:2], hexd)

    def locate(self, digest: str, size: int) -> str | bytes:
        """Path of the verified, uncompressed block (or its bytes, if the disk refused them),
        fetching it on a miss."""
        if digest in self._verified:
            self.stats.add(hits=1)
            return self.path(digest)
        while True:
            with self._lock:
                if digest in self._verified:
                    self.stats.add(hits=1)
                    return self.path(digest)
                if digest in self._memory:
                    self._memory.move_to_end(digest)
                    self.stats.add(hits=1)
                    return self._memory[digest]
                waiter = self._inflight.get(digest)
                if waiter is None:
                    event = self._inflight[digest] = threading.Event()
                    break
            waiter.wait()  # another thread is fetching this digest; then re-check
        try:
            return self._load(digest, size)
        finally:
            with self._lock:
                del self._inflight[digest]
            event.set()

    def _load(self, digest: str, size: int) -> str | bytes:
        path = self.path(digest)
        if self._check_on_disk(path, digest, size):
            self.stats.add(hits=1)
            with self._lock:
                self._verified.add(digest)
            return path
        self.stats.add(misses=1)
        try:
            frame = self.fetch(digest)
            data = block.decode(digest, frame, expected_size=size)
        except LazyfsError:
            self.stats.add(errors=1)
            raise
        self.stats.add(fetched_bytes=len(frame), fetched_raw_bytes=len(data))
        if self._insert(path, data):
            with self._lock:
                self._verified.add(digest)
            return path
        with self._lock:
            self._memory[digest] = data
            self._memory_bytes += len(data)
            while self._memory_bytes > MEMORY_FALLBACK and len(self._memory) > 1:
                self._memory_bytes -= len(self._memory.popitem(last=False)[1])
        return data

    def _check_on_disk(self, path: str, digest: str, size: int) -> bool:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return False
        if len(data) == size and "sha256:" + hashlib.sha256(data).hexdigest() == digest:
            try:
                os.utime(path)  # "recently used", for `lazyfs gc --node-cache`
            except OSError:
                pass
            return True
        log.error("cache: dropping damaged cached block %s (%d bytes on disk, %d expected)",
                  digest, len(data), size)
        self.stats.add(dropped_corrupt=1)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return False

    def _insert(self, path: str, data: bytes) -> bool:
        tmp = None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix=".part-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.rename(tmp, path)
            return True
        except OSError as exc:
            # A full or broken cache disk must not fail the read: the verified bytes are in hand.
            log.error("cache: cannot write block %s to %s: %s; serving it from memory",
                      os.path.basename(path), self.root, exc.strerror)
            self.stats.add(errors=1)
            if tmp:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return False

    def read(self, digest: str, size: int, offset: int, length: int) -> bytes:
        for _ in range(2):
            where = self.locate(digest, size)
            if isinstance(where, bytes):
                return where[offset:offset + length]
            try:
                fd = os.open(where, os.O_RDONLY)
            except FileNotFoundError:
                # Evicted by another process sharing the cache since we verified it: fetch again.
                with self._lock:
                    self._verified.discard(digest)
                continue
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)
        raise StoreUnavailable(f"node cache {self.root}: block {digest} keeps disappearing")


"""The cache server's disk cache: verified frames (as stored, still compressed), capped in bytes,
evicting the least recently used.

Layout: ``ROOT/{blocks,manifests}/XX/HEX`` plus ``ROOT/tmp`` for writes in progress and a ``lock``
file that keeps a second server off the same directory. Entries enter only through temp file +
rename after their digest checked out. After a restart the index is rebuilt from the directory
(recency from mtimes) and each entry is verified again the first time it is served, so a file torn
by a crash or damaged on disk is dropped and refetched, never sent.

Not thread-safe: the server calls it from its event loop only (file I/O is small and local).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from lazyfs.counters import Counters
from lazyfs.errors import LazyfsError, StoreUnavailable
from lazyfs.format import digest as digests
from lazyfs.fsutil import atomic_write

log = logging.getLogger("lazyfs.server.cache")
KINDS = ("blocks", "manifests")


@dataclass
class DiskCacheStats(Counters):
    # hits and misses are the server's metrics (a lookup is not yet a hit: see Filler.obtain)
    inserts: int = 0
    evictions: int = 0
    dropped_corrupt: int = 0
    write_errors: int = 0


# What says a cache file itself is bad: gone, or unreadable on its disk. Any other error (the
# socket's, the server out of descriptors or memory) ends the answer without blaming the file.
FILE_ERRORS = (errno.ENOENT, errno.EIO, errno.ESTALE, errno.EISDIR)


class DiskCache:
    def __init__(self, root: str | os.PathLike, capacity: int):
        self.root = Path(root)
        self.capacity = capacity
        self.stats = DiskCacheStats()
        self._lru: OrderedDict[tuple[str, str], int] = OrderedDict()  # (kind, digest) -> size
        self._verified: set[tuple[str, str]] = set()
        self._pins: dict[tuple[str, str], int] = {}
        self.bytes = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreUnavailable(f"cache dir {self.root}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise LazyfsError(f"cache dir {self.root} is in use by another lazyfs serve") from None
        self._load()

    def _load(self) -> None:
        tmp = self.root / "tmp"
        tmp.mkdir(exist_ok=True)
        for entry in os.scandir(tmp):  # we hold the lock: every temp file is a dead server's
            os.unlink(entry.path)
        found = []
        for kind in KINDS:
            base = self.root / kind
            base.mkdir(exist_ok=True)
            for sub in os.scandir(base):
                if not sub.is_dir(follow_symlinks=False):
                    continue  # (not this cache's: a stray file must not keep the server down)
                for entry in os.scandir(sub.path):
                    digest = "sha256:" + entry.name
                    # Only where path() would look for it: anything else would be counted
                    # against the cache's size and never found, nor ever removed.
                    if digests.is_valid(digest) and entry.name[:2] == sub.name and \
                            entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        found.append((st.st_mtime, kind, digest, st.st_size))
        for _, kind, digest, size in sorted(found):
            self._lru[(kind, digest)] = size
            self.bytes += size
        if found:
            log.info("cache %s: %d entries, %d bytes from before the restart", self.root, len(found),
                     self.bytes)
        self._evict()

    def path(self, kind: str, digest: str) -> str:
        hexd = digests.hex_part(digest)
        return os.path.join(self.root, kind, hexd[:2], hexd)

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, kind: str, digest: str) -> tuple[str, bool] | None:
        """(path, verified since this process started) of a cached entry, marking it recently used."""
        key = (kind, digest)
        if key not in self._lru:
            return None
        self._lru.move_to_end(key)
        return self.path(kind, digest), key in self._verified

    def size(self, kind: str, digest: str) -> int | None:
        return self._lru.get((kind, digest))

    def verified(self, kind: str, digest: str) -> bool:
        """Whether the entry is cached and was verified since this process started."""
        return (kind, digest) in self._verified and (kind, digest) in self._lru

    def mark_verified(self, kind: str, digest: str) -> None:
        self._verified.add((kind, digest))
        try:
            os.utime(self.path(kind, digest))  # recency survives a restart
        except OSError:
            pass

    def drop(self, kind: str, digest: str, corrupt: bool = False) -> bool:
        """Whether there was an entry to drop."""
        key = (kind, digest)
        size = self._lru.pop(key, None)
        if size is None:
            return False
        self.bytes -= size
        self._verified.discard(key)
        if corrupt:
            log.error("cache: dropping damaged cached %s %s", kind[:-1], digest)
            self.stats.add(dropped_corrupt=1)
        try:
            os.unlink(self.path(kind, digest))
        except FileNotFoundError:
            pass
        return True

    def insert(self, kind: str, digest: str, frame: bytes) -> str | None:
        """Store a verified frame; its path, or None when it cannot be cached (too big, disk error)."""
        key = (kind, digest)
        if key in self._lru:
            return self.path(kind, digest)
        if len(frame) > self.capacity:
            return None
        path = self.path(kind, digest)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, frame, self.root / "tmp", durable=False)
        except OSError as exc:
            log.error("cache: cannot write %s to %s: %s (serving it uncached)", digest, self.root,
                      exc.strerror)
            self.stats.add(write_errors=1)
            return None
        self._lru[key] = len(frame)
        self._verified.add(key)
        self.bytes += len(frame)
        self.stats.add(inserts=1)
        self._evict()
        return path

    def pin(self, kind: str, digest: str) -> None:
        """Keep an entry from eviction while a response is being sent from its file."""
        key = (kind, digest)
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, kind: str, digest: str) -> None:
        key = (kind, digest)
        n = self._pins.get(key, 0) - 1
        if n > 0:
            self._pins[key] = n
        else:
            self._pins.pop(key, None)
            self._evict()  # it may have been skipped while pinned

    def _evict(self) -> None:
        if self.bytes <= self.capacity:
            return
        for key in list(self._lru):
            if self.bytes <= self.capacity:
                break
            if key in self._pins:
                continue
            self.drop(*key)
            self.stats.add(evictions=1)

    def close(self) -> None:
        os.close(self._lock_fd)

"""The node cache's block files: writing a verified block durably, and judging one found there.

The kernel data path (lazyfs.fs.kernel) serves these files as they are, with no re-hash, so a
block's file appears under its name only once it is whole and on disk (temp file, fsync, rename),
and a file found there is trusted only after it was hashed again (``check``). A cache disk that
refuses writes (full, broken) must not fail reads: ``write`` says False, the caller keeps the
verified bytes in memory, and the disk is tried again every DISK_RETRY seconds.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from lazyfs.cache import layout
from lazyfs.format import digest as digests
from lazyfs.fsutil import atomic_write

log = logging.getLogger("lazyfs.cache")
DISK_RETRY = 5.0  # seconds between tries of a cache disk that refused a write

Identity = tuple[int, int, int]  # (inode, size, change time) of a file when it was verified


class CacheDisk:
    """Writes and checks block files under ``root``; counts into ``stats`` (CacheStats)."""

    def __init__(self, root: str | os.PathLike, stats, room: Callable[[int], object],
                 memory_capacity: int):
        self.root = root
        self.stats = stats
        self.room = room  # NodeCache.room: makes room under the node's cap before a write
        self.memory_capacity = memory_capacity  # named in the log when the disk refuses
        self._lock = threading.Lock()
        self._refused_at: float | None = None  # when the disk last refused a write

    @property
    def refusing(self) -> bool:
        return self._refused_at is not None

    def write(self, path: str, data: bytes, drop: bool = False) -> Identity | None:
        """Write a block's file: the identity of the file written; None if the disk refuses
        (said once per outage)."""
        refused_at = self._refused_at
        if refused_at is not None and time.monotonic() - refused_at < DISK_RETRY:
            return None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # Durable: a power cut must not leave a torn block under its name.
            with self.room(len(data)) as rename:
                written = atomic_write(path, data, layout.tmp_dir(self.root), durable=True,
                                       drop_pages=drop, rename=rename)
        except OSError as exc:
            self.stats.add(disk_write_errors=1)
            with self._lock:  # several readers meet a full disk at once: one says so
                first = self._refused_at is None
                self._refused_at = time.monotonic()
            if first:
                log.error("cache: cannot write blocks to %s (%s); serving them from memory (up to "
                          "%d MiB, the most used kept) and trying the disk again every %.0f s",
                          self.root, exc.strerror, self.memory_capacity >> 20, DISK_RETRY)
            return None
        if refused_at is not None:
            with self._lock:
                back, self._refused_at = self._refused_at is not None, None
            if back:
                log.warning("cache: writing blocks to %s again", self.root)
        return identity(written)

    def check(self, path: str, digest: str, size: int) -> Identity | None:
        """The file's identity if it holds the block, else None (a damaged file is dropped)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:  # unreadable (a bad sector, not a file): as good as damaged
            log.error("cache: dropping unreadable cached block %s (%s: %s)", digest, path, exc)
            self.drop(path)
            return None
        try:
            before = identity(os.fstat(fd))
            # (a file written while it was hashed is not the file that was hashed: not kept)
            if holds(fd, digest, size) and identity(os.fstat(fd)) == before:
                try:
                    os.utime(fd)  # "recently used", for `lazyfs gc --node-cache`
                except OSError:
                    pass
                return identity(os.fstat(fd))  # after utime, which moves the change time
            on_disk = os.fstat(fd).st_size
        except OSError as exc:  # its bytes cannot be read back
            log.error("cache: dropping unreadable cached block %s (%s: %s)", digest, path, exc)
            self.drop(path)
            return None
        finally:
            os.close(fd)
        log.error("cache: dropping damaged cached block %s (%d bytes on disk, %d expected)",
                  digest, on_disk, size)
        self.drop(path)
        return None

    def drop(self, path: str) -> None:
        """Remove a damaged block's file, and take its bytes off the node's ledger."""
        from lazyfs.cache import cap
        self.stats.add(dropped_corrupt=1)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return
        cap.ledger(self.root).evicted(size, 1)  # (its size as a walk finds it)


def identity(st: os.stat_result) -> Identity:
    return st.st_ino, st.st_size, st.st_ctime_ns


def holds(fd: int, digest: str, size: int) -> bool:
    """Whether the open file holds exactly the block: ``size`` bytes hashing to ``digest``."""
    parts, pos = [], 0
    while pos <= size:  # one byte past the size, to see a file that is too long
        chunk = os.pread(fd, size + 1 - pos, pos)
        if not chunk:
            break
        parts.append(chunk)
        pos += len(chunk)
    return pos == size and digests.compute(b"".join(parts)) == digest

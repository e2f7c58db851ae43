"""The node cache's block files: writing a verified block durably, and judging one found there.

The kernel data path (lazyfs.fs.kernel) serves these files as they are, with no re-hash, so a
block's file appears under its name only once it is whole and on disk (temp file, fsync, rename),
and a file found there is trusted only after it was hashed again (``check``). A cache disk that
refuses writes (full, broken) must not fail reads: ``write`` says False, the caller keeps the
verified bytes in memory, and the disk is tried again every DISK_RETRY seconds.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Callable

from lazyfs.cache import layout
from lazyfs.errors import LargerThanCache
from lazyfs.format import digest as digests
from lazyfs.format.block import MAX_BLOCK_SIZE
from lazyfs.fsutil import atomic_write

log = logging.getLogger("lazyfs.cache")
HASH_TRIES = 3  # hashes of a file that keeps changing while it is hashed, before it is left alone
# What a file that cannot be read back says (a bad sector, a file system error, not a regular
# file any more); other errors (EMFILE, ENOMEM, ...) are the reader's, not the file's.
BAD_FILE = frozenset({errno.EIO, errno.ENXIO, errno.EISDIR, errno.ENODEV, errno.EBADMSG,
                      errno.EUCLEAN, errno.ESTALE})
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
        self._said_too_large = False  # (a block larger than the cap: logged once)

    @property
    def refusing(self) -> bool:
        return self._refused_at is not None

    def write(self, path: str, data: bytes, drop: bool = False) -> Identity | None:
        """Write a block's file: the identity of the file written; None if the disk refuses
        (said once per outage) or the block is larger than the node cache's cap."""
        refused_at = self._refused_at
        if refused_at is not None and time.monotonic() - refused_at < DISK_RETRY:
            return None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # Durable: a power cut must not leave a torn block under its name.
            with self.room(len(data)) as rename:
                written = atomic_write(path, data, layout.tmp_dir(self.root), durable=True,
                                       drop_pages=drop, rename=rename)
        except LargerThanCache as exc:  # this block only: the disk takes the others
            if not self._said_too_large:
                self._said_too_large = True
                log.warning("cache: %s; blocks that large are served from memory", exc)
            return None
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

    def check(self, path: str, digest: str) -> Identity | None:
        """The file's identity if it holds the block, else None (a damaged file is dropped).
        Its size is in the identity: a manifest that gives the block another size is wrong, not
        the file, whose bytes every other image naming the block may still read (the caller
        refuses the manifest's reads, lazyfs.cache.nodecache)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self.unreadable(path, digest, exc)
        try:
            hashed = hashed_identity(fd, digest)
            if hashed is CHANGING:
                return None  # not trusted now, not dropped either
            if hashed is not None:
                try:
                    os.utime(fd)  # "recently used", for `lazyfs gc --node-cache`
                except OSError:
                    pass
                return identity(os.fstat(fd))  # after utime, which moves the change time
            on_disk = os.fstat(fd).st_size
        except OSError as exc:  # its bytes cannot be read back
            return self.unreadable(path, digest, exc)
        finally:
            os.close(fd)
        log.error("cache: dropping damaged cached block %s (%d bytes on disk, not hashing to it)",
                  digest, on_disk)
        self.drop(path)
        return None

    def unreadable(self, path: str, digest: str, exc: OSError) -> None:
        """A cached block's file that cannot be read is dropped like a damaged one, so that it
        is fetched again rather than fail every read of it; an error that is not the file's
        (out of descriptors or memory) is raised instead, and nothing is dropped."""
        if exc.errno not in BAD_FILE:
            raise exc
        log.error("cache: dropping unreadable cached block %s (%s: %s)", digest, path, exc)
        try:
            self.drop(path)
        except OSError as again:  # (the next write of it replaces it by rename anyway)
            log.error("cache: cannot drop %s: %s", path, again)
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


CHANGING = ("changing",)  # hashed_identity's answer for a file written to all the while


def hashed_identity(fd: int, digest: str):
    """The identity of the open file if it holds the block (its bytes, as many as it has, hash
    to ``digest``), taken before it was hashed and the same after (the file hashed is the file
    kept only if nothing wrote to it meanwhile; another process adopting it too, with its utime,
    moves its identity: hashed again, up to HASH_TRIES times, then CHANGING); None if it does
    not hold the block (a file larger than any block never does)."""
    for _ in range(HASH_TRIES):
        before = identity(os.fstat(fd))
        if before[1] > MAX_BLOCK_SIZE or not holds(fd, digest, before[1]):
            return None
        if identity(os.fstat(fd)) == before:
            return before
    return CHANGING


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

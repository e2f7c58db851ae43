"""Verified blocks on their way to a node cache's disk, served from memory until they are there.

A miss answers with the bytes it fetched at once and the write follows on a writer thread
(write-behind, up to WRITE_BEHIND bytes in flight; past that the caller writes before it
answers, so a slow disk slows reads rather than filling memory). A lazy restore's memory can be
held back instead (hold): only the next restore on the node reads it from disk, so it is written
once the restored process has what it needs (release_held), or at close at the latest (NodeCache.close).

The node cache owns the lock (one lock for what it knows is verified, in flight and landing, so
a block is always found in one of them) and the write itself (NodeCache._write).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

log = logging.getLogger("lazyfs.cache")
WRITE_BEHIND = 64 * 1024 * 1024
WRITERS = 2
HELD, BEHIND = "held", "behind"  # how take() took a block
LANDING = "landing"  # take() found the block landing already: nothing to write


class Landing:
    """``write(digest, data)`` puts a block on disk; ``keep(digest, data)`` keeps one in memory
    whose write failed (it must not be lost). ``lock`` is the node cache's."""

    def __init__(self, lock: threading.Lock, write: Callable[[str, bytes], object],
                 keep: Callable[[str, bytes], None]):
        self._lock, self._write, self._keep = lock, write, keep
        self._blocks: dict[str, bytes] = {}
        self._bytes = 0  # of the written-behind blocks (held ones are bounded by their room)
        self._writer: ThreadPoolExecutor | None = None
        self._hold: set[str] = set()
        self._hold_room = 0
        self._held: list[str] = []

    def get(self, digest: str) -> bytes | None:
        """The block's bytes while it lands (call with the lock held)."""
        return self._blocks.get(digest)

    def take(self, digest: str, data: bytes, disk_ok: bool) -> str | None:
        """Land a verified block: HELD (kept until release_held), BEHIND (written on a writer
        thread), LANDING (it is landing already: written once, and counted once), or None: the
        caller writes it itself (the write-behind is full, or the disk refused writes lately)."""
        size = len(data)
        with self._lock:
            if digest in self._blocks:
                return LANDING
            if digest in self._hold and size <= self._hold_room:
                self._blocks[digest] = data
                self._held.append(digest)
                self._hold_room -= size
                return HELD
            if not disk_ok or self._bytes + size > WRITE_BEHIND:
                return None
            self._blocks[digest] = data
            self._bytes += size
            writer = self._writer_pool()
        self._submit(writer, digest, data)
        return BEHIND

    def hold(self, digests, room: int) -> None:
        """Keep blocks of ``digests`` that arrive from now on in memory, up to ``room`` bytes in
        all, until release_held()."""
        with self._lock:
            self._hold, self._hold_room = set(digests), room

    def release_held(self) -> None:
        """Write the held blocks, behind (on the writer threads), and hold no more."""
        with self._lock:
            held, self._held, self._hold = self._held, [], set()
            if not held:
                return
            writer = self._writer_pool()
            jobs = [(digest, self._blocks[digest]) for digest in held]
        for digest, data in jobs:  # (not counted in the write-behind's bytes)
            self._submit(writer, digest, data, counted=False)

    def _submit(self, writer: ThreadPoolExecutor, digest: str, data: bytes, counted: bool = True) -> None:
        try:
            writer.submit(self._land, digest, data, counted)
        except RuntimeError:  # a flush or close shut that pool meanwhile: written here, not lost
            self._land(digest, data, counted)

    def flush(self) -> None:
        """Wait until every block landing is on disk (or refused by it)."""
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    def _writer_pool(self) -> ThreadPoolExecutor:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(WRITERS, thread_name_prefix="cache-write")
        return self._writer

    def _land(self, digest: str, data: bytes, counted: bool = True) -> None:
        """On a writer thread: the block to disk (durably), then no longer in memory here."""
        try:
            self._write(digest, data)
        except Exception:  # never lose the block: it stays readable from memory until dropped
            log.exception("cache: writing block %s failed", digest)
            self._keep(digest, data)
        finally:
            with self._lock:
                self._blocks.pop(digest, None)
                self._bytes -= len(data) if counted else 0

"""The node cache's running total (bytes and files), kept incrementally by every writer.

Scanning a cache of a million files costs seconds of CPU, and the total is wanted often: before
every block written under a cap, at every tick of the node agent, by every `lazyfs node status`.
So every process that writes into the cache or evicts from it adjusts one small file,
``<cache>/usage``, under an exclusive flock: four little-endian u64s, the bytes and files counted
(writes in flight included) and the bytes and files in flight. Bytes are reserved before they are
written (``reserve``), so writers in several processes cannot pass a cap together; a write that
landed ``commit``s, one that failed ``cancel``s. A writer gives its file its name inside
``commit``, under the lock: a file on disk whose bytes are still counted in flight is what a walk
would count twice (once found, once in flight), so no walk may see one.

A walk of the cache happens only where one is needed anyway: at a trim (to order what to evict)
and when the file is missing or torn. A walk sets the total to what it found (plus what is in
flight) only if no writer moved the ledger while it walked (``replace_if``: a file that landed
mid-walk might be missed); otherwise the trim subtracts what it evicted. Walks take turns, across
processes (``trimming``): two at once would each count the other's evictions as their own.

What can still drift: a block two processes wrote at once (counted twice: the next trim comes early, never late), a file
removed by hand, and the reservation of a writer killed mid-write. ``reconcile`` corrects it: the
node agent calls it every RECONCILE_EVERY seconds. Between calls the agent reads what is in flight
at every tick; whatever never left flight over the whole interval (the least amount seen) is a dead
writer's reservation, since no write takes that long, and is dropped first.
"""
from __future__ import annotations

import fcntl
import os
import struct
from contextlib import contextmanager
from typing import Callable

from lazyfs.cache import layout

RECORD = struct.Struct("<4Q")  # bytes, files, bytes in flight, files in flight
RECONCILE_EVERY = 600.0  # seconds between the agent's drift corrections (one walk each)
Record = tuple[int, int, int, int]


class Ledger:
    def __init__(self, root: str | os.PathLike, scan: Callable[[], tuple[int, int]]):
        """``scan``: (files, bytes) counted on disk (lazyfs.cache.cap.usage_scan)."""
        self.path = layout.ledger_path(root)
        self.scan = scan

    def _locked(self, fn):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fn(fd)
        finally:
            os.close(fd)  # (releases the lock)

    def _get(self, fd: int) -> Record:
        raw = os.pread(fd, RECORD.size, 0)
        if len(raw) != RECORD.size:  # new, or torn by a crash mid-write: walk once
            files, size = self.scan()
            self._put(fd, (size, files, 0, 0))
            return size, files, 0, 0
        return RECORD.unpack(raw)

    @staticmethod
    def _put(fd: int, rec: Record) -> None:
        os.pwrite(fd, RECORD.pack(*(max(0, x) for x in rec)), 0)

    @contextmanager
    def trimming(self, wait: bool = True):
        """One trim at a time on this cache, among all processes and threads. ``wait=False``:
        BlockingIOError at once if another trim is running (it makes the room anyway)."""
        fd = os.open(self.path.with_name(layout.LEDGER_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            yield
        finally:
            os.close(fd)

    def record(self) -> Record:
        return self._locked(self._get)

    def usage(self) -> tuple[int, int]:
        """(files, bytes) in the cache, writes in flight included."""
        size, files, _, _ = self.record()
        return files, size

    def reserve(self, nbytes: int, cap: int | None) -> bool:
        """Count one file of ``nbytes`` about to be written, if it fits under ``cap`` (None: no
        cap, always); False (nothing counted) when it does not fit."""
        def take(fd):
            size, files, fb, ff = self._get(fd)
            if cap is not None and size + nbytes > cap:
                return False
            self._put(fd, (size + nbytes, files + 1, fb + nbytes, ff + 1))
            return True
        return self._locked(take)

    def commit(self, nbytes: int, land: Callable[[], None] | None = None) -> None:
        """The reserved file landed: no longer in flight (still counted). ``land``: what gives
        the file its name (a rename), called under the lock first; if it raises, nothing moves
        (the writer then cancels)."""
        def done(fd):
            if land is not None:
                land()
            self._put(fd, _minus_flight(self._get(fd), nbytes))
        self._locked(done)

    def cancel(self, nbytes: int) -> None:
        """The reserved file was not written: neither counted nor in flight."""
        def undo(fd):
            size, files, fb, ff = _minus_flight(self._get(fd), nbytes)
            self._put(fd, (size - nbytes, files - 1, fb, ff))
        self._locked(undo)

    def evicted(self, nbytes: int, nfiles: int) -> None:
        self._locked(lambda fd: self._put(fd, _plus(self._get(fd), -nbytes, -nfiles)))

    def replace_if(self, before: Record, files: int, size: int) -> bool:
        """Set the total to a walk's (files, size) plus what is in flight, if the ledger is still
        ``before`` (no writer moved it during the walk)."""
        def compare_and_set(fd):
            rec = self._get(fd)
            if rec != before:
                return False
            fb, ff = rec[2:]
            self._put(fd, (size + fb, files + ff, fb, ff))
            return True
        return self._locked(compare_and_set)

    def drop_stale(self, nbytes: int, nfiles: int) -> None:
        """Forget reservations of writers that are gone: counted and in flight, never landed."""
        def drop(fd):
            size, files, fb, ff = self._get(fd)
            nb, nf = min(nbytes, fb), min(nfiles, ff)
            self._put(fd, (size - nb, files - nf, fb - nb, ff - nf))
        self._locked(drop)

    def reconcile(self, stale: tuple[int, int] = (0, 0)) -> bool:
        """Correct drift, without stopping writers: drop ``stale`` (bytes, files) of reservations
        (see the module's docstring), then walk once and set the total to what was found, unless a
        writer moved the ledger meanwhile (the next call tries again). True if it was set."""
        try:
            with self.trimming(wait=False):  # a trim's evictions would be counted twice
                if any(stale):
                    self.drop_stale(*stale)
                before = self.record()
                files, size = self.scan()
                return self.replace_if(before, files, size)
        except BlockingIOError:
            return False


def _plus(rec: Record, nbytes: int, nfiles: int) -> Record:
    return rec[0] + nbytes, rec[1] + nfiles, rec[2], rec[3]


def _minus_flight(rec: Record, nbytes: int) -> Record:
    return rec[0], rec[1], rec[2] - nbytes, rec[3] - 1

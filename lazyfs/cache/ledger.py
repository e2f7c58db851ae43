"""The node cache's running total (bytes and files), kept incrementally by every writer.

Scanning a cache of a million files costs seconds of CPU, and the total is wanted often: before
every block written under a cap, at every tick of the node agent, by every `lazyfs node status`.
So every process that writes into the cache or evicts from it adjusts one small file,
``<cache>/usage``, under an exclusive flock: four little-endian u64s, the bytes and files counted
(writes in flight included) and the bytes and files in flight. Bytes are reserved before they are
written (``reserve``), so writers in several processes cannot pass a cap together; a write that
landed ``commit``s, one that failed ``cancel``s.

A walk of the cache happens only where one is needed anyway: at a trim (to order what to evict)
and when the file is missing or torn. A walk sets the total to what it found (plus what is in
flight) only if no writer moved the ledger while it walked (``replace_if``: a file that landed
mid-walk might be missed); otherwise the trim subtracts what it evicted. Trims take turns, across
processes (``trimming``): two at once would each count the other's evictions as their own. What can still drift: a
block two processes wrote at once (counted twice: the next trim comes early, never late), a file
removed by hand, and the reservation of a writer killed mid-write. ``reconcile`` corrects it: the
node agent calls it every RECONCILE_EVERY seconds, and a reservation that has not moved between
two of its calls is taken for a dead writer's and dropped.
"""
from __future__ import annotations

import fcntl
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

NAME = "usage"
TRIM_LOCK = "usage.lock"
RECORD = struct.Struct("<4Q")  # bytes, files, bytes in flight, files in flight
RECONCILE_EVERY = 600.0  # seconds between the agent's drift corrections (one walk each)
Record = tuple[int, int, int, int]


class Ledger:
    def __init__(self, root: str | os.PathLike, scan: Callable[[], tuple[int, int]]):
        """``scan``: (files, bytes) counted on disk (lazyfs.cache.cap.usage_scan)."""
        self.path = Path(root) / NAME
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
    def trimming(self):
        """One trim at a time on this cache, among all processes and threads."""
        fd = os.open(self.path.with_name(TRIM_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
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

    def commit(self, nbytes: int) -> None:
        """The reserved file landed: no longer in flight (still counted)."""
        self._locked(lambda fd: self._put(fd, _minus_flight(self._get(fd), nbytes)))

    def cancel(self, nbytes: int) -> None:
        """The reserved file was not written: neither counted nor in flight."""
        def undo(fd):
            size, files, fb, ff = _minus_flight(self._get(fd), nbytes)
            self._put(fd, (size - nbytes, files - 1, fb, ff))
        self._locked(undo)

    def evicted(self, nbytes: int, nfiles: int) -> None:
        self._locked(lambda fd: self._put(fd, _plus(self._get(fd), -nbytes, -nfiles)))

    def replace_if(self, before: Record, files: int, size: int, drop_flight: bool = False) -> bool:
        """Set the total to a walk's (files, size) plus what is in flight, if the ledger is still
        ``before`` (no writer moved it during the walk); ``drop_flight``: count nothing in flight
        (reservations of writers that are gone)."""
        def compare_and_set(fd):
            rec = self._get(fd)
            if rec != before:
                return False
            fb, ff = (0, 0) if drop_flight else rec[2:]
            self._put(fd, (size + fb, files + ff, fb, ff))
            return True
        return self._locked(compare_and_set)

    def reconcile(self, last: Record | None = None) -> Record:
        """Correct drift with one walk, without stopping writers. ``last``: what this returned the
        previous time; a ledger that has not moved since has no live writer, so anything still in
        flight is a dead writer's and is dropped. Returns the record to pass next time."""
        before = self.record()
        files, size = self.scan()
        self.replace_if(before, files, size, drop_flight=before == last)
        return self.record()


def _plus(rec: Record, nbytes: int, nfiles: int) -> Record:
    return rec[0] + nbytes, rec[1] + nfiles, rec[2], rec[3]


def _minus_flight(rec: Record, nbytes: int) -> Record:
    return rec[0], rec[1], rec[2] - nbytes, rec[3] - 1

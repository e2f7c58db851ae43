"""Verified blocks held in memory while the node cache disk refuses them (full, read-only, broken).

Bounded in bytes, and scan-resistant: a workload larger than memory that reads its blocks over and
over (several readers, a page cache that was dropped) makes plain LRU evict every block just before
it is needed again, so every pass refetches everything. This is W-TinyLFU (as in Caffeine): a new
block enters a small LRU window (so the kernel's several reads of one block hit), and leaving the
window it enters the main LRU only if it has been used more often than the main LRU's victim.
Use counts are halved every so often, so a workload that moves on is followed. Not thread-safe:
NodeCache calls it under its lock.
"""
from __future__ import annotations

from collections import OrderedDict

WINDOW_SHARE = 0.25  # of the capacity, for blocks just fetched (several readers, readahead)
MAX_COUNT = 15


class MemoryBlocks:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._window: OrderedDict[str, bytes] = OrderedDict()
        self._main: OrderedDict[str, bytes] = OrderedDict()
        self._window_bytes = self._main_bytes = 0
        self._counts: dict[str, int] = {}
        self._uses = 0

    @property
    def bytes(self) -> int:
        return self._window_bytes + self._main_bytes

    def __len__(self) -> int:
        return len(self._window) + len(self._main)

    def __contains__(self, digest: str) -> bool:
        return digest in self._window or digest in self._main

    def get(self, digest: str) -> bytes | None:
        """The block's bytes, counting the use; None if not held."""
        for part in (self._window, self._main):
            data = part.get(digest)
            if data is not None:
                part.move_to_end(digest)
                self.used(digest)
                return data
        return None

    def used(self, digest: str) -> None:
        """Count a use of the block, held or not (a miss counts: it says the block is wanted)."""
        self._counts[digest] = min(self._counts.get(digest, 0) + 1, MAX_COUNT)
        self._uses += 1
        if self._uses >= 10 * max(64, len(self) + 1):  # age: yesterday's favourites fade
            self._counts = {d: n // 2 for d, n in self._counts.items() if n > 1}
            self._uses = 0

    def put(self, digest: str, data: bytes) -> None:
        if digest in self or len(data) > self.capacity:
            return
        self._window[digest] = data
        self._window_bytes += len(data)
        window_cap = max(int(self.capacity * WINDOW_SHARE), len(data))
        while self._window_bytes > window_cap and len(self._window) > 1:
            d, blob = self._window.popitem(last=False)
            self._window_bytes -= len(blob)
            self._admit(d, blob)

    def _admit(self, digest: str, data: bytes) -> None:
        """A block leaving the window enters the main part if there is room, or if it is used
        more often than what it would evict; else it is dropped."""
        room = self.capacity - int(self.capacity * WINDOW_SHARE)
        count = self._counts.get(digest, 0)
        while self._main_bytes + len(data) > room and self._main:
            victim = next(iter(self._main))
            if self._counts.get(victim, 0) >= count:
                return  # the incumbent is worth as much: keep it, drop the newcomer
            self._main_bytes -= len(self._main.pop(victim))
        if self._main_bytes + len(data) <= room:
            self._main[digest] = data
            self._main_bytes += len(data)

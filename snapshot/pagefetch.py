"""Fetching a pages file's blocks for a lazy restore, most urgent first.

A page fault of the restored process outranks readahead after it, which outranks the recorded
working set, which outranks the background transfer of everything else: a faulting thread waits
behind at most the blocks already on the wire. The fetch function verifies every block (it is
the node cache's read, or a store's fetch_block), so what comes back is the block's exact bytes.
"""
from __future__ import annotations

import heapq
import itertools
import threading
from typing import Callable

DEMAND, READAHEAD, PROFILE, BACKGROUND = 0, 1, 2, 3
NAMES = ("demand", "readahead", "profile", "background")


class ChunkFetcher:
    """``fetch(index) -> bytes`` on ``workers`` threads; ``deliver(index, data, priority)`` or
    ``fail(index, exc)`` is called on a worker thread as each arrives. An index queued or being
    fetched is not fetched twice; asking again with a higher priority moves it up the queue."""

    def __init__(self, fetch: Callable[[int], bytes], deliver, fail, workers: int = 8,
                 background_workers: int = 2):
        self.fetch, self.deliver, self.fail = fetch, deliver, fail
        self.background_workers = background_workers
        self._heap: list[tuple[int, int, int]] = []
        self._prio: dict[int, int] = {}  # queued or taken: its best priority
        self._taken: set[int] = set()
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stop = False
        self._busy_background = 0
        self._threads = [threading.Thread(target=self._work, name=f"pages-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def want(self, index: int, prio: int) -> None:
        with self._cv:
            if index in self._taken or self._prio.get(index, 99) <= prio:
                return
            self._prio[index] = prio
            heapq.heappush(self._heap, (prio, next(self._seq), index))
            self._cv.notify()

    def queued(self) -> int:
        with self._cv:
            return len(self._prio) - len(self._taken)

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(5)

    def _next(self) -> tuple[int, int] | None:
        with self._cv:
            while True:
                if self._stop:
                    return None
                while self._heap and (self._heap[0][2] in self._taken
                                      or self._prio.get(self._heap[0][2]) != self._heap[0][0]):
                    heapq.heappop(self._heap)  # stale: taken, or queued again higher
                # Background work leaves workers free for the faults that may come meanwhile.
                if self._heap and (self._heap[0][0] < BACKGROUND
                                   or self._busy_background < self.background_workers):
                    prio, _, index = heapq.heappop(self._heap)
                    self._taken.add(index)
                    if prio == BACKGROUND:
                        self._busy_background += 1
                    return index, prio
                self._cv.wait()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            index, prio = job
            try:
                data = self.fetch(index)
            except BaseException as exc:  # noqa: BLE001 - the handler decides what a failure means
                # Done before the handler hears of it: a fault that comes meanwhile (the handler
                # may leave a block fetched ahead missing) must fetch it again, not be ignored
                # as already under way and wait for ever.
                self._done(index, prio)
                self.fail(index, exc)
            else:
                try:
                    self.deliver(index, data, prio)
                finally:
                    self._done(index, prio)

    def _done(self, index: int, prio: int) -> None:
        with self._cv:  # asking for it again fetches it again (a forked child)
            self._taken.discard(index)
            if self._prio.get(index) == prio:
                del self._prio[index]
            if prio == BACKGROUND:
                self._busy_background -= 1
            self._cv.notify()

"""Slow work that many requests want at once, done once: the first to ask does it, and the
others wait for its outcome, success or error (as Go's singleflight). Forty pods of one cold
image then cost their server one tag lookup and one manifest, not forty.

Callers hold the agent's lock, which guards the table of flights; it is let go around the work
and around the wait."""
from __future__ import annotations

import threading
from typing import Callable, ContextManager, Hashable, TypeVar

T = TypeVar("T")


class _Flight:
    __slots__ = ("done", "result", "error")

    def __init__(self):
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class Flights:
    def __init__(self, unlocked: Callable[[], ContextManager]):
        self._unlocked = unlocked
        self._on: dict[Hashable, _Flight] = {}

    def do(self, key: Hashable, work: Callable[[], T]) -> T:
        """``work()``'s outcome, from this call or from the one in flight for ``key``. The
        waiters asked while it ran, so its answer is as fresh as their own would be."""
        flight = self._on.get(key)
        if flight is not None:
            with self._unlocked():
                flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result
        flight = self._on[key] = _Flight()
        try:
            with self._unlocked():
                flight.result = work()
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._on[key]
            flight.done.set()
        return flight.result

    def __len__(self) -> int:
        return len(self._on)

"""Thread-safe counters shared by stores, caches and the mount (tests and benchmarks read them)."""
from __future__ import annotations

import dataclasses
import threading

_lock = threading.Lock()


class Counters:
    """Mixin for a dataclass of int fields."""

    def add(self, **deltas: int) -> None:
        with _lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)

    def snapshot(self) -> dict:
        with _lock:
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

"""Leases: how a build and a garbage collection on one store keep out of each other's way.

Both sides write their lease first and then look at the others (restic's lock protocol): if a
build and a gc start together, at least one of them sees the other and backs off, so gc never
deletes a block a running build has decided to reuse. A lease not refreshed for LEASE_TTL seconds
belongs to a crashed process and is ignored (and removed by gc).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from lazyfs.errors import StoreError
from lazyfs.format.guard import JSON_ERRORS
from lazyfs.store.base import BlockStore

log = logging.getLogger("lazyfs.lease")
LEASE_TTL = 600.0
REFRESH_EVERY = 60.0


def check_name(name: str) -> str:
    """A lease name is one path component: stores use it as a file name or key suffix."""
    if not name or "/" in name or "\0" in name or name.startswith(".") or len(name) > 200:
        raise StoreError(f"invalid lease name {name[:100]!r}")
    return name


class LeaseConflict(StoreError):
    exit_code = 3


@dataclass
class LeaseInfo:
    name: str
    kind: str  # "build" or "gc"
    host: str
    pid: int
    refreshed: float

    def live(self, now: float) -> bool:
        return now - self.refreshed < LEASE_TTL


def read_leases(store: BlockStore) -> list[LeaseInfo]:
    out = []
    for name, raw in store.list_leases():
        try:
            d = json.loads(raw)
            out.append(LeaseInfo(name, d["kind"], d["host"], int(d["pid"]), float(d["refreshed"])))
        except (*JSON_ERRORS, KeyError, TypeError):
            out.append(LeaseInfo(name, "unknown", "?", 0, 0.0))  # unreadable: treat as stale
    return out


def _clock() -> float:
    """Seconds on a clock that counts a suspend: the monotonic clock does not, and a machine
    (a laptop, a paused VM) asleep past LEASE_TTL would not see that its lease lapsed meanwhile,
    while a gc elsewhere took it for dead."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Lease:
    """Hold a lease of ``kind`` for a with-block; refuse if a conflicting live lease exists."""

    def __init__(self, store: BlockStore, kind: str, conflicts: tuple[str, ...],
                 refresh_every: float = REFRESH_EVERY):
        self.store, self.kind, self.conflicts = store, kind, conflicts
        self.refresh_every = refresh_every
        self.name = f"{kind}-{uuid.uuid4().hex[:12]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok = _clock()
        self._lapsed = False  # a refresh came LEASE_TTL or more after the one before
        self._writing = threading.Lock()
        self._ended = False

    def _write(self) -> None:
        with self._writing:  # (never after the lease was let go: see __exit__)
            if self._ended:
                return
            self.store.put_lease(self.name, json.dumps({
                "kind": self.kind, "host": socket.gethostname(), "pid": os.getpid(),
                "refreshed": time.time()}).encode())

    def __enter__(self) -> "Lease":
        self._write()
        now = time.time()
        others = [l for l in read_leases(self.store)
                  if l.name != self.name and l.kind in self.conflicts and l.live(now)]
        if others:
            self.store.delete_lease(self.name)
            who = ", ".join(f"{l.kind} by pid {l.pid} on {l.host}" for l in others)
            raise LeaseConflict(f"store {self.store.url} is busy ({who}); try again when it is done")
        self._thread = threading.Thread(target=self._refresh, name="lease", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise if the lease lapsed at any time (a gc then may have swept what this work
        reuses): before writing what would reference it."""
        if self._lapsed or _clock() - self._last_ok >= LEASE_TTL:
            raise StoreError(f"lease {self.name} on {self.store.url} lapsed (not refreshed for "
                             f"{LEASE_TTL:.0f} s): a gc may have removed blocks this work reuses; "
                             "nothing was tagged, run it again")

    def _refresh(self) -> None:
        failing = False
        while not self._stop.wait(self.refresh_every):
            asked = _clock()  # (gc judges the time written, taken before the write)
            try:
                self._write()
            except Exception as exc:  # noqa: BLE001 - a transient store error must not kill the
                # build (the TTL covers it), but once the lease lapses gc may delete what the
                # build reuses: say so, once per outage, with how long is left.
                if not failing:
                    left = LEASE_TTL - (_clock() - self._last_ok)
                    log.warning("lease %s on %s: refresh failed (%s: %s); it lapses in %.0f s "
                                "unless a refresh succeeds", self.name, self.store.url,
                                type(exc).__name__, exc, max(0.0, left))
                failing = True
                continue
            if failing:
                log.warning("lease %s on %s: refreshed again", self.name, self.store.url)
            failing = False
            if asked - self._last_ok >= LEASE_TTL:
                self._lapsed = True
            self._last_ok = asked

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        # A refresh still writing (a slow store) finishes first, and none starts after: written
        # after the delete, the lease would make every gc wait for its TTL for work long done.
        held = self._writing.acquire(timeout=60)  # (a store hung longer: let go of it anyway)
        self._ended = True
        try:
            self.store.delete_lease(self.name)
        finally:
            if held:
                self._writing.release()


@contextmanager
def held_when_free(store: BlockStore, kind: str, conflicts: tuple[str, ...], patience: float = LEASE_TTL,
                   say: Callable[[str], None] = lambda m: None, every: float = 2.0) -> Iterator[Lease]:
    """A lease taken once the conflicting ones end, for work already done that must not be
    thrown away for their sake (a process dumped, whose snapshot a gc would otherwise cost):
    a gc ends within minutes. LeaseConflict after ``patience`` seconds."""
    deadline = time.monotonic() + patience
    said = False
    while True:
        lease = Lease(store, kind, conflicts)
        try:
            lease.__enter__()
            break
        except LeaseConflict as exc:
            if time.monotonic() >= deadline:
                raise
            if not said:
                say(f"{exc}; waiting for it to end")
                said = True
            time.sleep(every)
    try:
        yield lease
    finally:
        lease.__exit__(None, None, None)

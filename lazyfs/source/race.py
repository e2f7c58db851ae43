"""One fetch raced across a fleet's candidates (lazyfs.source.fleet.Fleet._race): failover at once,
hedging when an answer is slow, rounds again while every source fails, a hard deadline.

A failure moves on to the next candidate at once; a source whose answer failed verification is not
asked again for that fetch (it would give the same bytes). A slow answer is hedged: first with a
cache-only probe of the next server (a hit there wins; a miss costs nothing upstream), and only
after ESCALATE hedge delays with a full request that may fill from the origin, so that a burst of
slow answers does not turn into a burst of duplicate origin fetches.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Callable, Generic, TypeVar

from lazyfs.errors import WRONG_BYTES, LazyfsError, NotCached, NotFound, StoreUnavailable, StoreUnreachable
from lazyfs.store.base import BlockStore

log = logging.getLogger("lazyfs.fleet")
T = TypeVar("T")
RETRY_FIRST, RETRY_MAX = 0.05, 1.0  # backoff between rounds while every source fails
ESCALATE = 4  # hedge delays before a hedge may make another server fill from the origin


class Race(Generic[T]):
    def __init__(self, fleet, key: str, attempt: Callable[[str, BlockStore, bool], T], probes: bool):
        self.fleet, self.key, self.attempt = fleet, key, attempt
        self.hedge = fleet.hedge_delay()
        self.started = time.monotonic()
        self.deadline = self.started + fleet.options.deadline
        self.escalate_at = self.started + (ESCALATE * self.hedge if probes else 0.0)
        self.queue = deque(fleet.candidates(key))
        self.probed: set[str] = set()
        self.running: dict = {}  # future -> (name, full request?, launched at)
        self.errors: list[tuple[str, Exception]] = []
        self.round_from = 0  # where this round's errors start in self.errors
        self.absent_rounds = 0  # rounds in a row where every server that answered said NotFound
        self.last = self.started  # when the last request went out
        self.retry_in = RETRY_FIRST

    def run(self) -> T:
        try:
            return self._run()
        finally:
            # Attempts still queued for the pool's threads would run for nobody (and to a hung
            # server, hold a thread each for as long as its reads may wait).
            for fut in self.running:
                fut.cancel()

    def _run(self) -> T:
        self._launch(*self.queue.popleft(), True)
        while (now := time.monotonic()) < self.deadline:
            probing = self._probing(now)
            wake = self._wake(probing)
            done, _ = wait(self.running, timeout=max(0.0, min(wake, self.deadline) - now),
                           return_when=FIRST_COMPLETED)
            if not done:
                if self.queue and time.monotonic() >= wake:
                    self._hedge(probing)
                continue
            for fut in done:
                ok, result = self._collect(fut)
                if ok:
                    return result
            if not self._next():
                break
        self._give_up()

    def _launch(self, name: str, store: BlockStore, full: bool) -> None:
        fut = self.fleet._pool.submit(self.attempt, name, store, not full)
        self.running[fut] = (name, full, time.monotonic())
        self.last = time.monotonic()

    def _unprobed(self) -> list:
        return [c for c in self.queue if c[0] not in self.probed and c[0] != "origin"]

    def _probing(self, now: float) -> bool:
        """Whether the next hedge is a cache-only probe (before ESCALATE hedge delays)."""
        return now < self.escalate_at and bool(self._unprobed())

    def _wake(self, probing: bool) -> float:
        """When to hedge next, if no answer comes first."""
        if not self.queue:
            return self.deadline
        if probing:
            return self.last + self.hedge
        return max(self.last + self.hedge, self.escalate_at)

    def _hedge(self, probing: bool) -> None:
        self.fleet.stats.add(hedges=1)
        target = self._unprobed()[0] if probing else self.queue.popleft()
        if probing:
            self.probed.add(target[0])
        self._launch(*target, not probing)
        log.info("no answer for %s after %.2fs; %s %s", self.key, self.last - self.started,
                 "probing the cache of" if probing else "hedging to", target[0])

    def _collect(self, fut) -> tuple[bool, T | None]:
        """(True, answer), or (False, None) for a failed attempt (recorded, and its server
        dropped from the queue if it was a probe)."""
        name, full, launched = self.running.pop(fut)
        try:
            result = fut.result()
        except NotCached:
            self.fleet.stats.add(probe_misses=1)  # the probed server stays in the queue
            return False, None
        except Exception as exc:  # noqa: BLE001 - any failure of one source moves on
            if not isinstance(exc, LazyfsError):
                exc = StoreUnavailable(f"{name}: {type(exc).__name__}: {exc}")
            self.errors.append((name, exc))
            self.fleet._failed(name, self.key, exc)
            if not full:
                self.queue = deque(c for c in self.queue if c[0] != name)
            return False, None
        if full:
            self.fleet._observe(time.monotonic() - launched)
        self.fleet._answered(name)
        # Outrun: asked before the winner, on the wire (not waiting for a thread), and out for as
        # long as a hedge may fill from the origin. Ranked last for a while; a server merely asked
        # later, or an owner a little slow while it fills, keeps its place (its blocks are its to fill).
        now = time.monotonic()
        for other_fut, (other, other_full, other_launched) in self.running.items():
            if other_full and other != name and other_launched < launched and other_fut.running() \
                    and now - other_launched >= ESCALATE * self.hedge:
                self.fleet._outrun(other)
        return True, result

    def _next(self) -> bool:
        """After failures: fail over at once, or (every source failed) start another round after
        a backoff. False once the deadline leaves no time for one."""
        if self.queue and not any(full for _, full, _ in self.running.values()):
            self._launch(*self.queue.popleft(), True)  # failover: at once, and a full request
            return True
        if self.running:
            return True
        # The origin is the authority on absence; servers only when all of them agree. A server
        # that cannot be reached has no say, for two rounds in a row: one that is down must not
        # hold every lookup of something absent (a tag, an image's profile) to the deadline,
        # while one that answers NotFound to everything still loses to any that answers.
        for n, e in self.errors:
            if isinstance(e, NotFound) and (n == "origin" or
                                            all(isinstance(x, NotFound) for _, x in self.errors)):
                raise e
        answered = [e for _, e in self.errors[self.round_from:] if not isinstance(e, StoreUnreachable)]
        absent = bool(answered) and all(isinstance(e, NotFound) for e in answered)
        self.absent_rounds = self.absent_rounds + 1 if absent else 0
        if self.absent_rounds >= 2:
            raise answered[-1]
        # A source that answered with wrong bytes is not having an outage: asked again, it
        # gives the same bytes. With no other source left, that is the answer, at once.
        # (Bytes that do not even decode, a damaged frame, are wrong bytes too.)
        wrong = {n for n, e in self.errors if isinstance(e, WRONG_BYTES)}
        others = [c for c in self.fleet.candidates(self.key) if c[0] not in wrong]
        if not others:
            raise next(e for _, e in reversed(self.errors) if isinstance(e, WRONG_BYTES))
        # Every source failed: an outage (a server restarting, a network blip) is a stall, not
        # an error. Ask them all again, backing off, until the deadline.
        pause = min(self.retry_in, self.deadline - time.monotonic())
        if pause <= 0:
            return False
        time.sleep(pause)
        self.retry_in = min(self.retry_in * 2, RETRY_MAX)
        self.fleet.stats.add(retries=1)
        self.round_from = len(self.errors)
        self.queue = deque(others)
        self.probed.clear()
        self._launch(*self.queue.popleft(), True)
        return True

    def _give_up(self):
        fleet = self.fleet
        fleet.stats.add(deadline_failures=1)
        waiting = ", ".join(n for n, _, _ in self.running.values()) or "none"
        errors = self.errors[-len(fleet.clients) - 1:]  # the last round's, not every retry's
        last = "; ".join(dict.fromkeys(_named(n, e) for n, e in errors))  # (each once)
        log.error("%s: no good answer within the %.1fs deadline (still waiting on %s; failed: %s)",
                  self.key, fleet.options.deadline, waiting, last or "none")
        raise StoreUnavailable(f"{self.key}: no good answer within {fleet.options.deadline:.1f}s from "
                               f"{fleet.url}" + (f" (every source failed; last: {last})" if last else ""))


def _named(name: str, exc: Exception) -> str:
    """``name: error``, the name once (a store's errors often start with its URL already)."""
    text = str(exc)
    return text if text.startswith(name) else f"{name}: {text}"

"""Reading from several cache servers (and an optional origin store) as one store.

Each object has an owner order: the servers ranked by rendezvous hashing of its digest, then the
origin. A request goes to the first; a connection error, 5xx, timeout or wrong bytes moves it to
the next at once; a request still unanswered after ``hedge_after`` is duplicated to the next
("hedged") and the first good answer wins. Nothing takes longer than ``deadline``: then the read
fails with StoreUnavailable (EIO at the FUSE layer) and a log line. A server that failed is tried
last for a few seconds, so a dead server costs one refused connection, not one per block.
Every answer is verified against its digest here, so a lying server is just another failure.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, TypeVar

from lazyfs.counters import Counters
from lazyfs.errors import (WRONG_BYTES, LazyfsError, NotFound, StoreError,
                           StoreUnavailable)
from lazyfs.source import defaults, rendezvous
from lazyfs.source.race import Race
from lazyfs.store.base import BlockStore
from lazyfs.store.http import HttpStore
from lazyfs.records import objects
from lazyfs.store.counting import counted_frames

log = logging.getLogger("lazyfs.fleet")
T = TypeVar("T")
DOWN_FOR = 3.0


@dataclass
class FleetStats(Counters):
    block_gets: int = 0
    block_bytes: int = 0  # encoded bytes received for blocks
    manifest_gets: int = 0
    manifest_bytes: int = 0
    failovers: int = 0  # attempts that failed and moved on
    not_found: int = 0  # answers "no such object" (each candidate is still asked)
    hedges: int = 0  # attempts started because the previous one was slow
    probe_misses: int = 0  # cache-only hedges the other server could not answer from its cache
    origin_reads: int = 0
    wrong_bytes: int = 0
    deadline_failures: int = 0
    retries: int = 0  # rounds started again after every source had failed (an outage)


@dataclass(frozen=True)
class FleetOptions:
    hedge_after: float = defaults.HEDGE_AFTER
    deadline: float = defaults.DEADLINE
    connect_timeout: float = 1.0
    threads: int = 32


class Fleet:
    def __init__(self, servers: list[str], origin: BlockStore | None = None, token: str | None = None,
                 options: FleetOptions = FleetOptions()):
        urls = list(dict.fromkeys(u.rstrip("/") for u in servers))
        if not urls:
            raise StoreError("no cache servers given")
        self.options = options
        self.clients = {u: HttpStore(u, token, connect_timeout=options.connect_timeout,
                                     read_timeout=options.deadline, retries=0,
                                     connections=options.threads * 2) for u in urls}
        self.origin = origin
        self.url = " ".join(urls) + (f" (origin {origin.url})" if origin else "")
        self.stats = FleetStats()
        self._down: dict[str, float] = {}
        self._behind: dict[str, float] = {}  # outrun by a hedge: until when it is ranked last
        self._latencies: deque[float] = deque(maxlen=256)
        self._p90 = 0.0
        self._pool = ThreadPoolExecutor(options.threads * 2, thread_name_prefix="fleet")
        self._lock = threading.Lock()

    # -- choosing where to ask -------------------------------------------------------------------
    def candidates(self, key: str) -> list[tuple[str, BlockStore]]:
        now = time.monotonic()
        ranked = rendezvous.rank(list(self.clients), key)
        up = [u for u in ranked if max(self._down.get(u, 0.0), self._behind.get(u, 0.0)) <= now]
        order = up + [u for u in ranked if u not in up]
        out: list[tuple[str, BlockStore]] = [(u, self.clients[u]) for u in order]
        if self.origin is not None:
            out.append(("origin", self.origin))
        return out

    def _failed(self, name: str, key: str, exc: Exception) -> None:
        if isinstance(exc, NotFound):  # an answer, not a failure (say, an image with no profile)
            self.stats.add(not_found=1)
            log.debug("%s: %s", name, exc)
            return
        self.stats.add(failovers=1)
        if isinstance(exc, WRONG_BYTES):
            self.stats.add(wrong_bytes=1)
        with self._lock:
            now = time.monotonic()
            # Failing within the last minute: this outage has been logged already.
            known = self._down.get(name, float("-inf")) > now - 60
            self._down[name] = now + DOWN_FOR
        # Once per outage, not once per read: a server down for 10 s under 8 readers would
        # otherwise write thousands of lines.
        text = str(exc)
        (log.debug if known else log.warning)(
            "%s failed for %s: %s%s", name, key, text.removeprefix(f"{name}: "),
            "" if known else f" (said once until it answers; a read waits for some source up to "
                             f"--deadline, {self.options.deadline:g} s)")

    def _outrun(self, name: str) -> None:
        """A server another answered before, its request still out: ranked last for DOWN_FOR,
        so that one that hangs (alive, never answering) is not asked first again and again, each
        time holding a thread of the pool for as long as a read may wait."""
        with self._lock:
            self._behind[name] = time.monotonic() + DOWN_FOR

    def _answered(self, name: str) -> None:
        self._behind.pop(name, None)
        if name in self._down:
            with self._lock:
                was_down = self._down.pop(name, None) is not None
            if was_down:
                log.warning("%s answers again", name)

    def hedge_delay(self) -> float:
        """--hedge-after, or 2 x the recent p90 latency when the fleet is slower than that
        (under a burst every request is slow, and hedging them all would only add load)."""
        with self._lock:
            return max(self.options.hedge_after, 2 * self._p90)

    def _observe(self, seconds: float) -> None:
        with self._lock:
            self._latencies.append(seconds)
            if len(self._latencies) >= 16 and len(self._latencies) % 16 == 0:
                ordered = sorted(self._latencies)
                self._p90 = ordered[int(len(ordered) * 0.9)]

    def _race(self, key: str, attempt: Callable[[str, BlockStore, bool], T], probes: bool = True) -> T:
        """First good answer of ``attempt(name, store, cached_only)`` over the candidates
        (lazyfs.source.race: failover, hedging, rounds, the deadline)."""
        return Race(self, key, attempt, probes).run()

    def _count_origin(self, name: str) -> None:
        if name == "origin":
            self.stats.add(origin_reads=1)

    # -- reads -----------------------------------------------------------------------------------
    def _verified(self, kind: str, digest: str, raw: bool = False, size: int | None = None) -> bytes:
        """An object's frame (or, with raw, its decoded bytes) from the first source whose answer
        hashes to ``digest``."""
        def attempt(name: str, store: BlockStore, cached_only: bool) -> bytes:
            self._count_origin(name)
            if kind == objects.MANIFEST:
                frame = store.get_manifest(digest)
            elif cached_only:
                frame = store.get_block(digest, cached_only=True)
            else:
                frame = store.get_block(digest)
            data = objects.verify(kind, digest, frame, size)
            if kind == objects.BLOCK:
                self.stats.add(block_gets=1, block_bytes=len(frame))
            else:
                self.stats.add(manifest_gets=1, manifest_bytes=len(frame))
            return data if raw else frame
        return self._race(f"{kind} {digest}", attempt, probes=kind == objects.BLOCK)

    def fetch_block(self, digest: str, size: int | None = None) -> bytes:
        """The block's bytes, verified against ``digest`` (the node cache's fetch function)."""
        return self._verified(objects.BLOCK, digest, raw=True, size=size)

    def fetch_blocks(self, items: list[tuple[str, int]]):
        """Verified bytes of many blocks (the prefetcher's fetch): one batch request per owning
        server; what a batch does not deliver goes through fetch_block (failover, hedging)."""
        groups: dict[str, list[tuple[str, int]]] = {}
        for digest, size in items:
            # The owner _race would ask first: always a server (there is at least one).
            name, _ = self.candidates(f"block {digest}")[0]
            groups.setdefault(name, []).append((digest, size))
        for name, group in groups.items():
            client = self.clients[name]

            def counted(wanted, _client=client, _name=name):
                try:
                    yield from counted_frames(_client.get_blocks(wanted, within=self.options.deadline),
                                              self.stats)
                except LazyfsError as exc:
                    self._failed(_name, f"batch of {len(wanted)} blocks", exc)
                    raise

            def rejected(digest, exc, _name=name):
                self._failed(_name, f"block {digest}", exc)  # counted as a single read's would be
            yield from objects.fetch_blocks(group, self.fetch_block, counted, rejected)

    def get_block(self, digest: str) -> bytes:
        return self._verified(objects.BLOCK, digest)

    def get_manifest(self, digest: str) -> bytes:
        return self._verified(objects.MANIFEST, digest)

    def verified_manifest(self, digest: str) -> bytes:
        return self._verified(objects.MANIFEST, digest, raw=True)

    def get_tag(self, name: str, tag: str) -> str:
        return self._race(f"tag {name}:{tag}", lambda _n, store, _c: store.get_tag(name, tag),
                          probes=False)

    def contribute_profile(self, image_digest: str, start, workload: str | None) -> dict:
        """Hand one start's profile to the server the image's digest ranks first (so merges of
        one image meet on one server), or the next one up; never to the origin, which nodes do
        not write."""
        from lazyfs.format import profile as proffmt
        data = proffmt.encode(start)
        last: Exception | None = None
        for name, client in self.candidates(image_digest):
            if name == "origin":
                continue
            try:
                return client.contribute_profile(image_digest, workload, data)
            except StoreUnavailable as exc:
                last = exc
        raise last or StoreUnavailable("no cache server to take the profile")

    def check(self, write: bool = False) -> None:
        if write:
            raise StoreError("a --server fleet is read-only here; publish with --store")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients.values():
            client.close()
        if self.origin is not None:
            self.origin.close()

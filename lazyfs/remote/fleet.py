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
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, TypeVar

from lazyfs.counters import Counters
from lazyfs.errors import (IntegrityError, FormatError, LazyfsError, NotFound, StoreError,
                           StoreUnavailable)
from lazyfs.format import block
from lazyfs.remote import rendezvous
from lazyfs.store.base import BlockStore
from lazyfs.store.http import HttpStore
from lazyfs.store.objects import MAX_MANIFEST

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
    hedges: int = 0  # attempts started because the previous one was slow
    origin_reads: int = 0
    wrong_bytes: int = 0
    deadline_failures: int = 0


@dataclass(frozen=True)
class FleetOptions:
    hedge_after: float = 0.5
    deadline: float = 30.0
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
        self._pool = ThreadPoolExecutor(options.threads * 2, thread_name_prefix="fleet")
        self._lock = threading.Lock()

    # -- choosing where to ask -------------------------------------------------------------------
    def candidates(self, key: str) -> list[tuple[str, BlockStore]]:
        now = time.monotonic()
        ranked = rendezvous.rank(list(self.clients), key)
        up = [u for u in ranked if self._down.get(u, 0.0) <= now]
        order = up + [u for u in ranked if u not in up]
        out: list[tuple[str, BlockStore]] = [(u, self.clients[u]) for u in order]
        if self.origin is not None:
            out.append(("origin", self.origin))
        return out

    def _failed(self, name: str, key: str, exc: Exception) -> None:
        self.stats.add(failovers=1)
        if isinstance(exc, (IntegrityError, FormatError)):
            self.stats.add(wrong_bytes=1)
        if name != "origin" and not isinstance(exc, NotFound):
            with self._lock:
                self._down[name] = time.monotonic() + DOWN_FOR
        log.warning("%s failed for %s: %s", name, key, exc)

    def _race(self, key: str, attempt: Callable[[str, BlockStore], T]) -> T:
        """First good answer of ``attempt`` over the candidates, with failover and hedging."""
        opts = self.options
        candidates = self.candidates(key)
        deadline = time.monotonic() + opts.deadline
        running: dict = {}
        errors: list[tuple[str, Exception]] = []

        def launch() -> None:
            name, store = candidates[len(running) + len(errors)]
            running[self._pool.submit(attempt, name, store)] = name

        launch()
        while True:
            remaining = deadline - time.monotonic()
            more = len(running) + len(errors) < len(candidates)
            if remaining <= 0:
                break
            done, _ = wait(running, timeout=min(remaining, opts.hedge_after) if more else remaining,
                           return_when=FIRST_COMPLETED)
            if not done:
                if more:
                    self.stats.add(hedges=1)
                    log.info("no answer for %s after %.2fs; hedging to %s", key, opts.hedge_after,
                             candidates[len(running) + len(errors)][0])
                    launch()
                continue
            for fut in done:
                name = running.pop(fut)
                try:
                    return fut.result()
                except Exception as exc:  # noqa: BLE001 - any failure of one source moves on
                    if not isinstance(exc, LazyfsError):
                        exc = StoreUnavailable(f"{name}: {type(exc).__name__}: {exc}")
                    errors.append((name, exc))
                    self._failed(name, key, exc)
            if not running:
                if len(errors) < len(candidates):
                    launch()
                    continue
                # The origin is the authority on absence; servers only when all of them agree.
                for n, e in errors:
                    if isinstance(e, NotFound) and (n == "origin" or
                                                    all(isinstance(x, NotFound) for _, x in errors)):
                        raise e
                tried = "; ".join(f"{n}: {e}" for n, e in errors)
                raise StoreUnavailable(f"{key}: every source failed ({tried})")
        self.stats.add(deadline_failures=1)
        tried = ", ".join(n for n in running.values()) or "none"
        log.error("%s: no good answer within the %.1fs deadline (still waiting on %s; failed: %s)",
                  key, opts.deadline, tried, "; ".join(f"{n}: {e}" for n, e in errors) or "none")
        raise StoreUnavailable(f"{key}: no answer within {opts.deadline:.1f}s from {self.url}")

    def _count_origin(self, name: str) -> None:
        if name == "origin":
            self.stats.add(origin_reads=1)

    # -- reads -----------------------------------------------------------------------------------
    def _verified(self, kind: str, digest: str, raw: bool = False, size: int | None = None) -> bytes:
        """An object's frame (or, with raw, its decoded bytes) from the first source whose answer
        hashes to ``digest``."""
        limit = MAX_MANIFEST if kind == "manifest" else block.MAX_BLOCK_SIZE

        def attempt(name: str, store: BlockStore) -> bytes:
            self._count_origin(name)
            frame = store.get_block(digest) if kind == "block" else store.get_manifest(digest)
            data = block.decode(digest, frame, expected_size=size, limit=limit)
            if kind == "block":
                self.stats.add(block_gets=1, block_bytes=len(frame))
            else:
                self.stats.add(manifest_gets=1, manifest_bytes=len(frame))
            return data if raw else frame
        return self._race(f"{kind} {digest}", attempt)

    def fetch_block(self, digest: str, size: int | None = None) -> bytes:
        """The block's bytes, verified against ``digest`` (the node cache's fetch function)."""
        return self._verified("block", digest, raw=True, size=size)

    def get_block(self, digest: str) -> bytes:
        return self._verified("block", digest)

    def get_manifest(self, digest: str) -> bytes:
        return self._verified("manifest", digest)

    def get_tag(self, name: str, tag: str) -> str:
        return self._race(f"tag {name}:{tag}", lambda _n, store: store.get_tag(name, tag))

    def check(self, write: bool = False) -> None:
        if write:
            raise StoreError("a --server fleet is read-only here; publish with --store")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients.values():
            client.close()
        if self.origin is not None:
            self.origin.close()

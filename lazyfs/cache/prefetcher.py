"""Startup-profile prefetch: fetch the blocks a recorded profile says come next, in its order.

Streams (by default one) each take the next blocks of the profile that nobody has or is
fetching, claim them in the node cache and fetch them in one batch request (64 blocks, 32 MiB of
512 KiB blocks). On a 2-core node one stream of large batches beat more, smaller ones
(docs/benchmarks.md): inflating and hashing compete with the workload for the CPU. With
``overlap``, two streams take turns so the next batch's request is out before the last one ends,
and the link does not idle while the server starts each answer. A demand read never waits
behind the queue: it only waits for a block a stream is already receiving (which is the fastest
way to get it); everything not yet claimed it fetches itself, at once. Blocks arrive verified
(the fetch function checks every digest), so a wrong profile costs bandwidth, never bytes.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from lazyfs.cache.nodecache import Claim, NodeCache
from lazyfs.counters import Counters
from lazyfs.errors import BlockFormatError, LazyfsError, NotFound

log = logging.getLogger("lazyfs.prefetch")
FetchMany = Callable[[list[tuple[str, int]]], Iterator[tuple[str, "bytes | Exception"]]]


@dataclass
class PrefetchStats(Counters):
    planned: int = 0  # profile blocks the image references
    planned_bytes: int = 0
    fetched: int = 0  # blocks this prefetcher brought in
    fetched_bytes: int = 0
    already: int = 0  # cached, or claimed by a demand read first
    failed: int = 0
    missing: int = 0  # of those failed, blocks the source does not have
    batches: int = 0
    done: int = 0  # 1 once every stream has finished
    elapsed_ms: int = 0


class Prefetcher:
    def __init__(self, cache: NodeCache, fetch_many: FetchMany, blocks: Iterable[tuple[str, int]],
                 batch: int = 64, streams: int = 1, quiet: bool = False, unchecked: bool = False,
                 overlap: int = 0, on_block: Callable[[str, bytes], None] | None = None):
        self.cache = cache
        # ``on_block(digest, data)``: each block this prefetcher brought in, verified, once it is
        # in the cache (on the stream's thread), for a consumer that wants them all as they come
        # rather than waiting on each in turn.
        self.on_block = on_block
        self.fetch_many = fetch_many
        self.blocks = list(blocks)
        self.batch = max(1, batch)
        self.streams = max(1, streams)
        self.quiet = quiet
        # ``unchecked``: a list nobody checked against what the source has (a snapshot's working
        # set names image blocks the page server cannot check without the image's manifest):
        # once more of its blocks turned out missing than were fetched, a batch's worth at
        # least (less ``overlap``), the rest is not asked for either. Advice that names what nobody has costs a
        # request, not one per batch of it.
        self.unchecked = unchecked
        # ``overlap``: the streams take turns, each asking for its next batch once the batch
        # before has at most this many blocks still to come. One request at a time left the
        # link idle while each batch's answer started (15-50 ms at the server, under load),
        # where two at once split it between two batches and delayed both.
        self.overlap = overlap
        self._turn = threading.Semaphore(1) if overlap else None
        self.stats = PrefetchStats(planned=len(self.blocks),
                                   planned_bytes=sum(n for _, n in self.blocks))
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._running = 0
        self._t0 = 0.0

    def start(self) -> "Prefetcher":
        self._t0 = time.monotonic()
        self._running = self.streams
        for i in range(self.streams):
            t = threading.Thread(target=self._stream, name=f"profile-prefetch-{i}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def run(self) -> "Prefetcher":
        """One stream, on the caller's thread (fetch_missing's, started for it)."""
        self._t0 = time.monotonic()
        self._running = 1
        self._stream()
        return self

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _take(self, claims: ExitStack) -> dict[str, tuple[int, Claim]]:
        """The next blocks of the profile this stream now owns (skipping what is cached or
        already being fetched), with their claims, which ``claims`` releases at the latest."""
        out: dict[str, tuple[int, Claim]] = {}
        while len(out) < self.batch and not self._stop.is_set():
            with self._lock:
                if self._next >= len(self.blocks):
                    break
                digest, size = self.blocks[self._next]
                self._next += 1
            claim = self.cache.claim(digest)
            if claim is None:
                self.stats.add(already=1)
                continue
            claims.enter_context(claim)
            try:
                on_disk = self.cache.adopt(digest, size)  # from an earlier mount: verified, done
            except OSError:  # unreadable cache file: fetch it; storing the fetch will say more
                on_disk = False
            except BlockFormatError as exc:  # on disk, and not the size the list says: its
                claim.release()  # reads are refused, and a fetch would be refused the same
                self.stats.add(failed=1)
                log.debug("prefetch of %s: %s", digest, exc)
                continue
            if on_disk:
                claim.release()
                self.stats.add(already=1)
                continue
            out[digest] = (size, claim)
        return out

    def _stream(self) -> None:
        try:
            while not self._stop.is_set():
                # Every claim of a batch is released when it is done, fetched or not: a claim
                # left behind would make readers of that block wait for nothing.
                turn = self._take_turn()
                try:
                    if self._bogus():
                        break
                    with ExitStack() as claims:
                        mine = self._take(claims)
                        if not mine:
                            break
                        self._fetch(mine, turn)
                finally:
                    turn()
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self.stats.add(done=1, elapsed_ms=int((time.monotonic() - self._t0) * 1000))
                s = self.stats.snapshot()
                (log.debug if self.quiet else log.info)("prefetch done in %d ms: %d of %d blocks fetched (%d bytes), "
                         "%d already there, %d failed", s["elapsed_ms"], s["fetched"], s["planned"],
                         s["fetched_bytes"], s["already"], s["failed"])

    def _take_turn(self) -> Callable[[], None]:
        """Wait for this stream's turn to ask (with ``overlap``); returns what hands it on, which
        does so once however often it is called."""
        if self._turn is None:
            return lambda: None
        self._turn.acquire()
        handed = threading.Lock()  # (acquired once: the first call hands the turn on)

        def hand_on() -> None:
            if handed.acquire(blocking=False):
                self._turn.release()
        return hand_on

    def _hand(self, digest: str, data: bytes) -> None:
        try:
            self.on_block(digest, data)
        except Exception:  # noqa: BLE001 - the block is in the cache: its reader still gets it
            log.exception("prefetch: handing on block %s failed", digest)

    def _bogus(self) -> bool:
        """Whether an unchecked list has named too much that nobody has to ask for more (then
        every stream stops). Counted when the next request would go out: with ``overlap`` that
        is before the batch ahead has ended, so its last blocks are not waited for."""
        s = self.stats
        if not (self.unchecked and s.missing >= max(1, self.batch - self.overlap)
                and s.missing > s.fetched):
            return False
        with self._lock:
            first = not self._stop.is_set()
            self._stop.set()
        if first:
            log.warning("prefetch: %d of the blocks asked for are missing at the source; not "
                        "asking for the rest", s.missing)
        return True

    def _fetch(self, mine: dict[str, tuple[int, Claim]], hand_on=lambda: None) -> None:
        self.stats.add(batches=1)
        try:
            for digest, result in self.fetch_many([(d, n) for d, (n, _) in mine.items()]):
                if digest not in mine:
                    continue
                size, claim = mine.pop(digest)
                arrived = None
                try:
                    if isinstance(result, Exception):
                        raise result
                    self.cache.complete(digest, size, result)
                    self.stats.add(fetched=1, fetched_bytes=size)
                    arrived = result
                except (LazyfsError, OSError) as exc:
                    # The read that needs it will fetch it itself, and report if it fails.
                    self.stats.add(failed=1, missing=int(isinstance(exc, NotFound)))
                    log.debug("prefetch of %s failed: %s", digest, exc)
                finally:
                    claim.release()  # its readers go on now, not at the end of the batch
                    if len(mine) <= self.overlap:
                        hand_on()
                if arrived is not None and self.on_block is not None:
                    self._hand(digest, arrived)
        except (LazyfsError, OSError) as exc:
            log.warning("profile prefetch batch failed: %s", exc)
        self.stats.add(failed=len(mine))  # what the batch never delivered


def fetch_missing(cache: NodeCache, fetch_many: FetchMany, wanted: list[tuple[str, int]],
                  before=None) -> None:
    """Batch-fetch in the background those of ``wanted`` the node has no file for (sibling
    prefetch): verifying unused blocks already on disk would cost a warm node reads and
    hashing for nothing. ``before`` is told which those are before any is fetched."""
    missing = [(d, n) for d, n in wanted if not os.path.exists(cache.path(d))]
    if missing:
        # At most BACKGROUND_BATCHES at once, each on a thread of its own: past that a batch is
        # left out (it is only a guess; the reads it guessed fetch for themselves), rather than
        # queued behind batches stuck on a slow server, or a thread started per batch without end.
        if not _slots.acquire(blocking=False):
            log.debug("background batch of %d blocks left out: %d batches in flight", len(missing),
                      BACKGROUND_BATCHES)
            return
        thread = threading.Thread(target=_logged, name="batch-prefetch", daemon=True,
                                  args=(Prefetcher(cache, fetch_many, missing, batch=len(missing),
                                                   quiet=True), before, missing))
        try:
            thread.start()
        except (RuntimeError, MemoryError) as exc:  # no thread to be had (a limit on tasks): the
            _slots.release()  # guess is left out, and the read that made it still answers
            _no_thread(len(missing), exc)
        except BaseException:
            _slots.release()
            raise


def _no_thread(blocks: int, exc: BaseException) -> None:
    """Said once at warning level (every read may make a guess), then at debug."""
    global _no_thread_said
    level = logging.DEBUG if _no_thread_said else logging.WARNING
    _no_thread_said = True
    log.log(level, "background batch of %d blocks left out: %s (no more thread failures are "
            "said at this level)", blocks, exc)


_no_thread_said = False
BACKGROUND_BATCHES = 16  # sibling and readahead batches of one mount in flight at once
_slots = threading.BoundedSemaphore(BACKGROUND_BATCHES)


def _logged(prefetcher: Prefetcher, before, missing: list[tuple[str, int]]) -> None:
    try:
        if before is not None:  # (on this thread: a batch that never started is no guess)
            before(missing)
        prefetcher.run()
    except Exception:  # a fault of ours: said, as a thread of its own would have said it
        log.exception("a background batch prefetch failed")
    finally:
        _slots.release()



"""A directory of verified, decompressed blocks, shared by all images (and mounts) on a node.

The fetch function is injected: ``fetch(digest, size)`` returns the block's bytes and must have
verified them against the digest (lazyfs.records.objects.fetch_block, Fleet.fetch_block), so the
cache knows nothing of stores or networks, and tests and benchmarks read the same counters.
Concurrent misses for one digest make one fetch (single-flight). Blocks enter the cache only
after their digest checks out, via temp file + fsync + rename, written behind the read that
fetched them (lazyfs.cache.landing): the verified bytes are served from memory at once (a miss
never waits on the disk), and the kernel, which reads the cache directory itself on the kernel
data path, sees a block's file only once it is durable. Each cached file is re-hashed the first
time a process uses it and again whenever its file changed since (inode, size or change time),
so a file damaged or rewritten on disk (power cut, bit rot, a local writer) is dropped and
fetched again rather than served. Writing and judging the block files is lazyfs.cache.disk's.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lazyfs.cache import layout
from lazyfs.cache.disk import CHANGING, CacheDisk, hashed_identity, identity
from lazyfs.cache.landing import BEHIND, LANDING, Landing
from lazyfs.cache.memory import MemoryBlocks
from lazyfs.counters import Counters
from lazyfs.errors import BlockFormatError, LazyfsError, StoreUnavailable

log = logging.getLogger("lazyfs.cache")
MEMORY_FALLBACK = 64 * 1024 * 1024
STALE_TEMP_SECONDS = 600
PREFETCH_QUEUE = 64
CLAIM_WAIT = 120.0  # seconds a reader waits for another's fetch of a block before its own


class Claim:
    """A block one caller is loading (NodeCache.claim); release() (or leaving the with-block)
    wakes its readers. Releasing twice is harmless."""

    def __init__(self, cache: "NodeCache", digest: str):
        self.cache, self.digest = cache, digest
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.cache._release(self.digest)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class CacheStats(Counters):
    hits: int = 0
    misses: int = 0  # fetches from the store
    fetched_raw_bytes: int = 0
    prefetched: int = 0  # misses started by no read (readahead, a batch, background completion)
    dropped_corrupt: int = 0
    errors: int = 0
    disk_write_errors: int = 0  # blocks the cache disk refused (they were served from memory)
    memory_bytes: int = 0  # held in memory meanwhile (lazyfs.cache.memory, bounded)
    written_behind: int = 0  # blocks written after the read that fetched them was answered
    evicted: int = 0  # files this mount's trims removed to keep the node cache's cap
    evicted_bytes: int = 0
    # Where reads wait (the per-miss breakdown in docs/benchmarks.md): on their own fetch (a
    # demand miss: the round trip, inflating and hashing), or on a block another thread is
    # bringing in (a batch, a readahead, another read of it).
    demand_us: int = 0  # summed over the demand misses (``misses - prefetched``)
    waits: int = 0
    wait_us: int = 0


class NodeCache:
    def __init__(self, root: str | os.PathLike, fetch: Callable[[str, int], bytes],
                 prefetch_threads: int = 8, claim_wait: float = CLAIM_WAIT,
                 memory_fallback: int = MEMORY_FALLBACK, cap_bytes: int | None = None):
        self.root = Path(root)
        # The node's cap (lazyfs node --cache-size): room is made before a block is written, so
        # the cache never grows past it; ``keep_longer`` (the startup profile's blocks) go last.
        self.cap_bytes = cap_bytes
        self.keep_longer: set[str] = set()
        # Blocks to leave out of the page cache once written, so that pages of their files found
        # there later mean the kernel read them: the guesses of a mount that learns a startup
        # profile (lazyfs.fs.autoprofile). Only those: dropping every block would make the kernel
        # read back from disk what a start fetched for it.
        self.drop_after_write: set[str] = set()
        self.claim_wait = claim_wait
        self.fetch = fetch
        self.prefetch_threads = prefetch_threads
        self._prefetch_pool: ThreadPoolExecutor | None = None
        self._prefetching = 0
        self.stats = CacheStats()
        # Verified blocks on disk, with the identity their file had then (inode, size, change
        # time): a file changed since (its ctime moved; no user-space write can keep it) is
        # verified again before a byte of it is served (docs/security.md).
        self._verified: dict[str, tuple[int, int, int]] = {}
        self._inflight: dict[str, _Loading] = {}
        self._lock = threading.Lock()
        # Verified blocks on their way to disk (behind their reads, or held): served from there.
        self._landing = Landing(self._lock, self._write, self._keep)
        # Verified blocks that could not be written to disk (cache disk full): served from memory.
        self._memory = MemoryBlocks(memory_fallback)
        self._disk = CacheDisk(self.root, self.stats, self.room, memory_fallback)
        layout.blocks_dir(self.root).mkdir(parents=True, exist_ok=True)
        layout.tmp_dir(self.root).mkdir(exist_ok=True)
        self._sweep_temp()

    def _sweep_temp(self) -> None:
        """Drop temp files a crashed process left. The cache is shared, so only old ones: a fresh
        one may belong to another daemon's write in progress."""
        cutoff = time.time() - STALE_TEMP_SECONDS
        for entry in os.scandir(layout.tmp_dir(self.root)):
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except OSError:
                pass

    def path(self, digest: str) -> str:
        return layout.block_path(self.root, digest)

    def locate(self, digest: str, size: int, prefetch: bool = False) -> str | bytes:
        """Path of the verified, uncompressed block (or its bytes, if the disk refused them),
        fetching it on a miss."""
        if digest in self._verified:
            self.stats.add(hits=1)
            return self.path(digest)
        owned = True
        while True:
            found, waiter = self._claim(digest)
            if found is not None:
                self.stats.add(hits=1)
                return found
            if waiter is None:
                break  # ours to load
            # Another thread is fetching this digest; then re-check. Its fetch is bounded by the
            # source's deadline, so a wait past claim_wait means a claim nobody will release:
            # fetch it here rather than wait forever.
            # Until claim_wait after the claim was taken, not after this reader came: the other
            # blocks of a batch stuck on one server were claimed with it, and their readers then
            # give up on it together instead of one claim_wait each.
            t0 = time.monotonic()
            arrived = waiter.wait(max(0.0, waiter.since + self.claim_wait - t0))
            self.stats.add(waits=1, wait_us=int((time.monotonic() - t0) * 1e6))
            if not arrived:
                log.warning("cache: block %s has been loading elsewhere for %.0f s; fetching it "
                            "here", digest, self.claim_wait)
                owned = False
                break
        try:
            where = self._adopt(digest, size)
            if where is not None:
                return where
            self.stats.add(misses=1, prefetched=int(prefetch))
            t0 = time.monotonic()
            try:
                data = self.fetch(digest, size)
            except LazyfsError:
                self.stats.add(errors=1)
                raise
            if not prefetch:
                self.stats.add(demand_us=int((time.monotonic() - t0) * 1e6))
            return self._store(digest, size, data)
        finally:
            if owned:
                self._release(digest)

    def _claim(self, digest: str) -> tuple[str | bytes | None, threading.Event | None]:
        """(where, None) if the block is known good; (None, event) if another thread is loading
        it; (None, None) if the caller now owns loading it (and must _release() it)."""
        with self._lock:
            if digest in self._verified:
                return self.path(digest), None
            data = self._landing.get(digest) or (self._memory.get(digest) if self._memory else None)
            if data is not None:
                return data, None
            waiter = self._inflight.get(digest)
            if waiter is None:
                self._inflight[digest] = _Loading()
            return None, waiter

    def claim(self, digest: str) -> "Claim | None":
        """Own the loading of a block nobody has or is loading (a batch prefetch): a Claim, or
        None if it is cached or another thread loads it. Readers of a claimed block wait for the
        owner, who may adopt() or complete() it and then releases the claim: by leaving it as a
        context manager, so a claim is released whatever happens."""
        found, waiter = self._claim(digest)
        return Claim(self, digest) if found is None and waiter is None else None

    def _release(self, digest: str) -> None:
        with self._lock:
            event = self._inflight.pop(digest, None)
        if event is not None:
            event.set()

    def _adopt(self, digest: str, size: int, read: bool = True) -> str | None:
        """The block's path if a good copy is already on disk (another process fetched it);
        BlockFormatError if the block is not ``size`` bytes (the manifest's mistake: the file
        is kept, for the images that name it rightly). ``read``: for a read, which it counts as
        a hit (a batch prefetch finding it there is no read: its reader's hit comes later)."""
        path = self.path(digest)
        known = self._disk.check(path, digest)
        if known is None:
            return None
        with self._lock:
            self._verified[digest] = known
        _same_size(digest, known[1], size)
        if read:
            self.stats.add(hits=1)
        return path

    def on_disk(self, digest: str) -> bool:
        """Whether the block's file is in the cache directory (without fetching or verifying)."""
        return digest in self._verified or os.path.exists(self.path(digest))

    def adopt(self, digest: str, size: int) -> bool:
        """Whether a good copy of the block is on disk, now known to this cache (a batch
        prefetch's check before it fetches; not a read, so no hit)."""
        return self._adopt(digest, size, read=False) is not None

    def complete(self, digest: str, size: int, data: bytes) -> None:
        """Enter bytes a batch fetch brought (the caller verified them against the digest)."""
        self.stats.add(misses=1, prefetched=1)
        self._store(digest, size, data)

    def _store(self, digest: str, size: int, data: bytes) -> str | bytes:
        if len(data) != size:  # the fetch function verified the digest; the manifest gives the size
            self.stats.add(errors=1)
            raise BlockFormatError(f"{len(data)} bytes, the manifest says {size}", digest)
        self.stats.add(fetched_raw_bytes=len(data))
        with self._lock:
            # Fetched twice (a reader that stopped waiting on a stuck claim, then the claim's
            # owner): the file is written, and its bytes counted in the ledger, once.
            if self._verified.get(digest) is not None:
                return self.path(digest)
        taken = self._landing.take(digest, data, disk_ok=not self._disk.refusing)
        if taken == LANDING:
            return data
        if taken is None:
            return self._write(digest, data)
        if taken == BEHIND:
            self.stats.add(written_behind=1)
        return data

    def hold(self, digests, room: int) -> None:
        """Keep blocks of ``digests`` that arrive from now on in memory, up to ``room`` bytes in
        all, instead of writing them at once: a lazy restore's memory, which only the next
        restore on this node reads from disk, written once the restored process has what it
        needs (release_held). Readers are served from memory meanwhile; close() writes them."""
        self._landing.hold(digests, room)

    def release_held(self) -> None:
        """Write the held blocks, behind (on the writer threads), and hold no more."""
        self._landing.release_held()

    def _keep(self, digest: str, data: bytes) -> None:
        """A verified block the disk did not take, kept in memory (bounded)."""
        with self._lock:
            self._memory.used(digest)
            self._memory.put(digest, data)
            self.stats.memory_bytes = self._memory.bytes

    def _write(self, digest: str, data: bytes) -> str | bytes:
        """Write a verified block; its path, or its bytes if the disk refused it (then held in
        memory, bounded)."""
        path = self.path(digest)
        # The identity of the file written, not of whatever is at its name by now: a file put
        # there since is hashed again before a read trusts it (read, _reverify).
        known = self._disk.write(path, data, drop=digest in self.drop_after_write)
        if known is not None:
            with self._lock:
                self._verified[digest] = known
            return path
        self._keep(digest, data)
        return data

    def room(self, n: int):
        """Write one file of ``n`` bytes into the cache inside this block (cap.room): every
        writer into the cache uses it (blocks here, whole files in the completer, EROFS images
        in the daemon)."""
        from lazyfs.cache import cap
        return cap.room(self.root, n, self.cap_bytes, self.keep_longer, self.stats)

    def prefetch(self, wanted) -> None:
        """Start fetching (digest, size) pairs in the background unless cached or in flight; a
        bounded queue, so a burst of readahead never piles up unbounded work."""
        for digest, size in wanted:
            with self._lock:
                if digest in self._verified or digest in self._inflight or digest in self._memory:
                    continue
                if self._prefetching >= PREFETCH_QUEUE:
                    return
                self._prefetching += 1
                if self._prefetch_pool is None:
                    self._prefetch_pool = ThreadPoolExecutor(self.prefetch_threads,
                                                             thread_name_prefix="prefetch")
            try:
                self._prefetch_pool.submit(self._prefetch_one, digest, size)
            except RuntimeError:  # shut down (unmounting): the read itself still works
                with self._lock:
                    self._prefetching -= 1
                return

    def _prefetch_one(self, digest: str, size: int) -> None:
        try:
            self.locate(digest, size, prefetch=True)
        except (LazyfsError, OSError) as exc:  # the read that needs it will fetch and report
            log.debug("prefetch of %s failed: %s", digest, exc)
        finally:
            with self._lock:
                self._prefetching -= 1

    def close(self) -> None:
        if self._prefetch_pool is not None:
            self._prefetch_pool.shutdown(wait=False, cancel_futures=True)
        self.release_held()
        self.flush()

    def flush(self) -> None:
        """Wait until every block written behind its read is on disk (or refused by it)."""
        self._landing.flush()

    def read(self, digest: str, size: int, offset: int, length: int) -> bytes:
        for _ in range(3):
            where = self.locate(digest, size)
            if isinstance(where, bytes):
                _same_size(digest, len(where), size)
                return where[offset:offset + length]
            try:
                fd = os.open(where, os.O_RDONLY)
            except FileNotFoundError:
                # Evicted by another process sharing the cache since we verified it: fetch again.
                with self._lock:
                    self._verified.pop(digest, None)
                continue
            except OSError as exc:  # unreadable now (a bad sector, not a file any more): refetch
                self._unreadable(where, digest, exc)
                continue
            try:
                st = os.fstat(fd)
                if identity(st) != self._verified.get(digest) and \
                        not self._reverify(fd, where, digest):
                    continue  # changed on disk and wrong now: dropped, fetched again
                _same_size(digest, st.st_size, size)
                got = os.pread(fd, length, offset)
                if identity(os.fstat(fd)) == identity(st):  # (not written while it was read)
                    return got
                with self._lock:  # hashed again, or dropped, on the next turn
                    self._verified[digest] = None
                continue
            except OSError as exc:
                self._unreadable(where, digest, exc)
            finally:
                os.close(fd)
        raise StoreUnavailable(f"node cache {self.root}: block {digest} keeps disappearing")

    def _unreadable(self, path: str, digest: str, exc: OSError) -> None:
        """A cached block that cannot be read any more: dropped and fetched again
        (CacheDisk.unreadable; an error that is not the file's is raised)."""
        with self._lock:
            self._verified.pop(digest, None)
        self._disk.unreadable(path, digest, exc)

    def _reverify(self, fd: int, path: str, digest: str) -> bool:
        """A verified block's file changed since (another process touched it, or someone wrote
        to it): hash it again; keep it if it is still the block, else drop it. Whatever size the
        reader's manifest gives it: a wrong one is refused after (_same_size), never dropped."""
        hashed = hashed_identity(fd, digest)
        if hashed is CHANGING:
            return False  # hashed again next time, dropped by nobody
        if hashed is not None:
            with self._lock:
                self._verified[digest] = hashed
            return True
        log.error("cache: block %s changed on disk after it was verified (%s); dropping it and "
                  "fetching it again", digest, path)
        with self._lock:
            self._verified.pop(digest, None)
        self._disk.drop(path)
        return False


class _Loading(threading.Event):
    """Set when the block's loader is done with it; ``since``: when it claimed it."""

    def __init__(self):
        super().__init__()
        self.since = time.monotonic()


def _same_size(digest: str, actual: int, expected: int) -> None:
    """The block this digest names is ``actual`` bytes; a manifest giving it another size is
    wrong, and its reads would come back short or shifted: refused instead (EIO)."""
    if actual != expected:
        raise BlockFormatError(f"is {actual} bytes, not the {expected} the manifest says", digest)

"""The node cache's size cap: least recently used files go first, startup-profile blocks last.

Recency is max(atime, mtime): a FUSE mount touches a block it serves, and what the kernel serves
(lazyfs.fs.kernel) gets its access time from the kernel. Blocks listed in the startup profile of
an image the node has mounted are evicted only when nothing else is left to evict: they are what
the next cold start of that image reads first (docs/node.md has the measurement).

Evicting is safe beside running mounts, which is why this needs no lock: a file that is open keeps
its bytes until closed, and a block that vanished before a read is fetched again (the FUSE path's
NodeCache.read retries; on the kernel path overlayfs falls through to the FUSE data layer). A read
never sees wrong bytes, only a refetch.

How full the cache is comes from its ledger (lazyfs.cache.ledger), kept by every writer; only a
trim walks the whole cache, to order what to evict, and sets the ledger to what it found.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lazyfs.cache import layout
from lazyfs.cache.ledger import Ledger
from lazyfs.errors import LargerThanCache

log = logging.getLogger("lazyfs.cache")
TRIM_TO = 0.9  # a trim goes below the cap, so the next one is not one block away
TRIM_TRIES = 3  # rounds a trim for a write makes while other writes keep taking the room


@dataclass
class TrimReport:
    """What a trim of the node cache found and evicted (`lazyfs gc --node-cache` prints it)."""
    files: int = 0
    bytes_before: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    kept_profile: int = 0  # profile blocks that survived because other files could go
    dry_run: bool = False  # nothing was removed: ``evicted`` is what would have been

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _files(root: str | os.PathLike) -> list[tuple[float, int, str]]:
    out = []
    for sub in layout.EVICTABLE:
        for dirpath, _, names in os.walk(Path(root, sub)):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                out.append((max(st.st_mtime, st.st_atime), st.st_size, path))
    return out


def usage_scan(root: str | os.PathLike) -> tuple[int, int]:
    """(files, bytes) in the cache, counted by walking it: seconds on a million files."""
    files = _files(root)
    return len(files), sum(size for _, size, _ in files)


def ledger(root: str | os.PathLike) -> Ledger:
    """The cache's running total (created from one scan the first time)."""
    return Ledger(root, lambda: usage_scan(root))


def usage(root: str | os.PathLike) -> tuple[int, int]:
    """(files, bytes) in the cache, from its ledger: no walk."""
    if not os.path.isdir(root):
        return 0, 0
    return ledger(root).usage()


def trim(root: str | os.PathLike, max_bytes: int, keep_longer: Iterable[str] = (),
         dry_run: bool = False, below: float = TRIM_TO, reserve: int = 0, wait: bool = True) -> TrimReport:
    """Evict until the cache holds at most ``max_bytes`` (``below`` × that, once it was over).
    ``keep_longer``: block digests (hex or sha256:hex) to evict only after everything else.
    ``reserve``: then count a file of that many bytes about to be written (lazyfs.cache.ledger),
    without evicting anything if another trim has made room for it meanwhile. ``wait=False``:
    nothing at all if another trim is running (BlockingIOError). The ledger learns
    what was evicted (and, when no writer moved it meanwhile, what the walk found)."""
    if dry_run or not os.path.isdir(root):  # (no cache yet: nothing to evict, nothing to count)
        return _trim(root, max_bytes, keep_longer, below, None)
    book = ledger(root)
    cap = max_bytes + reserve
    with book.trimming(wait):
        report = TrimReport()
        for _ in range(TRIM_TRIES):
            if reserve and book.reserve(reserve, cap):
                return report
            got = _trim(root, max_bytes, keep_longer, below, book)
            report = TrimReport(got.files, got.bytes_before, report.evicted + got.evicted,
                                report.evicted_bytes + got.evicted_bytes, got.kept_profile)
            if not reserve or not got.evicted:
                break
        if reserve:
            book.reserve(reserve, None)  # no more room can be made: what is left is in flight
        return report


def larger_than_cap(n: int, cap_bytes: int | None) -> bool:
    """Whether a file of ``n`` bytes can never be in a cache of this cap (room refuses it)."""
    return cap_bytes is not None and n > cap_bytes


@contextmanager
def room(root: str | os.PathLike, n: int, cap_bytes: int | None, keep_longer: Iterable[str] = (),
         stats=None):
    """Write one file of ``n`` bytes into the cache inside this block, counted in the cache's
    ledger, and under the cap if there is one: the bytes are reserved before they are written,
    across every process writing into this cache, and when they would not fit a trim makes room
    first (``stats``, a CacheStats, counts what it evicted). A write that fails gives its
    reservation back. It yields the rename that gives the file its name (fsutil.atomic_write's
    ``rename``): the ledger counts the file as landed in the same step (lazyfs.cache.ledger).
    LargerThanCache, with nothing evicted, for a file larger than the cap itself."""
    if larger_than_cap(n, cap_bytes):
        raise LargerThanCache(f"a file of {n} bytes does not fit in the node cache {root}, whose "
                              f"cap is {cap_bytes} bytes")
    book = ledger(root)
    if not book.reserve(n, cap_bytes):
        report = trim(root, max(0, cap_bytes - n), keep_longer, reserve=n)
        if report.evicted:
            if stats is not None:
                stats.add(evicted=report.evicted, evicted_bytes=report.evicted_bytes)
            log.info("cache: evicted %d files (%d bytes) to stay under the %d-byte cap",
                     report.evicted, report.evicted_bytes, cap_bytes)
    landed = False

    def rename(src, dst) -> None:
        def land() -> None:
            nonlocal landed
            os.rename(src, dst)
            landed = True  # (counted from here, even if the ledger's write then fails)
        book.commit(n, land)

    try:
        yield rename
    except BaseException:
        if not landed:
            book.cancel(n)
        raise
    if not landed:
        book.commit(n)


def _trim(root, max_bytes: int, keep_longer: Iterable[str], below: float,
          book: Ledger | None) -> TrimReport:
    """One walk and eviction; ``book`` None: a dry run (nothing removed, no ledger)."""
    keep = {d.removeprefix("sha256:") for d in keep_longer}
    before = book.record() if book else None
    files = _files(root)
    report = TrimReport(files=len(files), bytes_before=sum(size for _, size, _ in files))
    total = report.bytes_before
    # Writes in flight will land: room for them too, or they would pass the cap once on disk.
    flight = before[2] if book else 0
    if total + flight <= max_bytes:
        if book:
            book.replace_if(before, len(files), total)
        return report
    goal = int(max_bytes * below) - flight
    order = sorted(files, key=lambda f: (os.path.basename(f[2]) in keep, f[0]))
    for _, size, path in order:
        if total <= goal:
            break
        total -= size
        if book:
            try:
                os.unlink(path)
            except FileNotFoundError:  # removed meanwhile (by hand): no longer there to count
                continue
        report.evicted += 1
        report.evicted_bytes += size
    report.kept_profile = sum(1 for _, _, p in files if os.path.basename(p) in keep and os.path.exists(p))
    if book and not book.replace_if(before, len(files) - report.evicted, total):
        book.evicted(report.evicted_bytes, report.evicted)
    return report


def keep_longer(shared_mounts) -> set[str]:
    """The startup-profile blocks of the images the agent has mounted (lazyfs.node.table.Shared)."""
    out: set[str] = set()
    for s in shared_mounts:
        out |= set(s.profile_blocks)
    return out


def collect(root: str | os.PathLike, max_bytes: int, dry_run: bool = False) -> TrimReport:
    """`lazyfs gc --node-cache`: evict least recently used files (blocks, whole objects, EROFS
    metadata images) until the cache is at most ``max_bytes`` (all of it, not TRIM_TO of it;
    this module's docstring says why that is safe beside mounts)."""
    report = trim(root, max_bytes, dry_run=dry_run, below=1.0)
    report.dry_run = dry_run
    return report

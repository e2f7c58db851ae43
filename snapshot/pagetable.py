"""Bookkeeping for a lazy restore: which block holds each missing page of each restored task.
Pure, no I/O (the page handler, lazypages.py, does the kernel side).

Pages are tracked per task as runs (first page, pages-file offset, pages); CRIU cuts nothing
smaller than a page and snapshot.files cuts pages files at page boundaries, so every page lies
in exactly one block.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from lazyfs.errors import LazyfsError
from snapshot.criuimg import PAGE, PageMap


class PageLayoutError(LazyfsError):
    """A snapshot's page images are laid out in a way a lazy restore cannot serve."""


@dataclass
class Blocks:
    """Every block of every pages file, numbered globally: key -> (digest, size, file, start)."""
    digests: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    files: dict[str, tuple[int, list[int]]] = field(default_factory=dict)  # name -> (first key, starts)
    # Identical memory (a forked tree's shared pages, zeroed runs) makes identical blocks: one
    # fetch serves every key with that digest.
    by_digest: dict[str, list[int]] = field(default_factory=dict)

    def add_file(self, name: str, chunks) -> None:
        first, starts, off = len(self.digests), [], 0
        for digest, size in chunks:
            if off % PAGE:
                raise PageLayoutError(f"{name}: block boundary at {off} is not page aligned")
            starts.append(off)
            same = self.by_digest.setdefault(digest, [])
            if same and self.sizes[same[0]] != size:
                # One fetch, checked at one size, serves every key with its digest: at another
                # size a copy would run past the block's bytes (into the server's own memory).
                raise PageLayoutError(f"{name}: block {digest} is listed as {size} bytes and as "
                                      f"{self.sizes[same[0]]}")
            same.append(len(self.digests))
            self.digests.append(digest)
            self.sizes.append(size)
            off += size
        self.files[name] = (first, starts)

    def key(self, name: str, offset: int) -> tuple[int, int]:
        """(block key, offset of the block in its file) for a byte of a pages file."""
        first, starts = self.files[name]
        i = bisect.bisect_right(starts, offset) - 1
        return first + i, starts[i]


class Task:
    """One restored process's lazily mapped memory (threads share it), kept as runs of pages: a
    process's memory comes as a few hundred runs of up to millions of pages, and its faults
    wait until criu's hand-over is tracked (the bench's snapshot-one, 134,000 pages: about 60 ms
    of the page server's interpreter page by page, while criu restored on the same cores).

    ``spans``: where the task's snapshot memory is, (first page, pages, pages-file offset),
    disjoint, by first page. ``missing``: what of it is not in yet, by the block that holds it:
    runs of (first page, offset in the block, pages)."""

    def __init__(self, name: str, fd: int, pages_file: str):
        self.name, self.fd, self.pages_file = name, fd, pages_file
        self.spans: list[tuple[int, int, int]] = []
        self.missing: dict[int, list[tuple[int, int, int]]] = {}
        self.pages_missing = 0
        self.live = False  # its memory is registered (restore finished, or it faulted)
        self.last_key = -2  # block of the last fault, and how far ahead to read while the
        self.window = 0     # faults keep walking forward (as file readahead does)
        self.ahead: list[int] = []  # blocks read ahead of the walk, not yet passed by it

    def track_runs(self, blocks: Blocks, runs) -> None:
        """Memory to serve: runs of (first page, pages-file offset, pages), none of it in yet."""
        first, starts = blocks.files[self.pages_file]
        size = starts[-1] + blocks.sizes[first + len(starts) - 1] if starts else 0
        for page, off, count in runs:
            end = off + count * PAGE
            if off < 0 or end > size:  # (the snapshot's pagemap and its pages file disagree)
                raise PageLayoutError(f"{self.pages_file}: pages at {off}..{end} lie outside its "
                                      f"{size} bytes")
            if count <= 0:
                continue
            bisect.insort(self.spans, (page, count, off))
            i = bisect.bisect_right(starts, off) - 1
            while off < end:
                stop = min(end, starts[i + 1]) if i + 1 < len(starts) else end
                n = (stop - off) // PAGE
                self.missing.setdefault(first + i, []).append((page, off - starts[i], n))
                self.pages_missing += n
                page, off, i = page + n, stop, i + 1

    def all_runs(self) -> list[tuple[int, int, int]]:
        """Every page of snapshot memory the task has, in, or not: (first page, offset, pages)."""
        return [(page, off, count) for page, count, off in self.spans]

    def key_of(self, blocks: Blocks, page: int) -> int | None:
        """The block holding ``page``, if the page is snapshot memory not in yet."""
        i = bisect.bisect_right(self.spans, (page, math.inf)) - 1
        if i < 0 or page >= self.spans[i][0] + self.spans[i][1]:
            return None
        first, _, off = self.spans[i]
        key, _ = blocks.key(self.pages_file, off + (page - first) * PAGE)
        if any(p <= page < p + n for p, _, n in self.missing.get(key, ())):
            return key
        return None

    def take(self, key: int) -> list[tuple[int, int, int]]:
        """Block ``key``'s missing pages, to be copied in now (they are missing no more): runs
        of (first page, offset in the block, pages)."""
        runs = self.missing.pop(key, [])
        self.pages_missing -= sum(n for _, _, n in runs)
        return runs

    def put_back(self, key: int, runs) -> None:
        """Pages of block ``key`` taken to be copied in that the kernel did not take (yet):
        missing again, runs of (first page, offset in the block, pages)."""
        runs = [run for run in runs if run[2] > 0]
        if runs:
            self.missing.setdefault(key, []).extend(runs)
            self.pages_missing += sum(n for _, _, n in runs)

    def drop(self, blocks: Blocks, first: int, last: int) -> None:
        """Pages [first, last) hold no snapshot memory from now on (madvise, munmap)."""
        for page, count, off in self._cut(first, last):
            self._drop_missing(blocks, page, count, off)

    def remap(self, blocks: Blocks, old: int, new: int, n: int) -> None:
        """Pages [old, old + n) moved to [new, new + n) (mremap), what is not in yet with them."""
        moved = self._cut(old, old + n)
        runs = [run for piece in moved for run in self._drop_missing(blocks, *piece)]
        self.drop(blocks, new, new + n)  # (what was there is gone)
        for page, count, off in moved:
            bisect.insort(self.spans, (page - old + new, count, off))
        for key, (page, off, count) in runs:
            self.missing.setdefault(key, []).append((page - old + new, off, count))
            self.pages_missing += count

    def forget(self) -> None:
        """The process has gone: nothing more to serve."""
        self.spans.clear()
        self.missing.clear()
        self.pages_missing = 0

    def _cut(self, first: int, last: int) -> list[tuple[int, int, int]]:
        """Take [first, last) out of the spans; the pieces cut, as (first page, pages, offset)."""
        cut, kept = [], []
        for span in self.spans:
            inside, outside = _split(span, first, last)
            kept += outside
            if inside:
                cut.append(inside)
        if cut:
            self.spans = kept
        return cut

    def _drop_missing(self, blocks: Blocks, page: int, count: int, off: int) -> list:
        """Take pages [page, page + count) (at pages-file offset ``off``) out of what is missing;
        the runs taken, as (key, (first page, offset in the block, pages))."""
        taken = []
        key, _ = blocks.key(self.pages_file, off)
        end_key, _ = blocks.key(self.pages_file, off + (count - 1) * PAGE)
        for k in range(key, end_key + 1):
            runs = self.missing.get(k)
            if not runs:
                continue
            left = []
            for p, o, n in runs:
                inside, outside = _split((p, n, o), page, page + count)
                left += [(q, oo, m) for q, m, oo in outside]
                if inside:
                    q, m, oo = inside
                    taken.append((k, (q, oo, m)))
                    self.pages_missing -= m
            if left:
                self.missing[k] = left
            else:
                del self.missing[k]
        return taken


def _split(run: tuple[int, int, int], first: int, last: int):
    """A run (first page, pages, offset of its first page) against pages [first, last): the part
    inside (or None) and the parts outside, each a run of the same shape."""
    page, count, off = run
    lo, hi = max(page, first), min(page + count, last)
    if lo >= hi:
        return None, [run]
    outside = []
    if page < lo:
        outside.append((page, lo - page, off))
    if hi < page + count:
        outside.append((hi, page + count - hi, off + (hi - page) * PAGE))
    return (lo, hi - lo, off + (lo - page) * PAGE), outside


def lazy_runs(pagemap: PageMap, wiped=()) -> list[tuple[int, int, int]]:
    """The lazy pages as runs: (first page, pages-file offset, count). Less ``wiped``, [start,
    end) address ranges (sorted, disjoint) that a restore zeroes (snapshot/wipe.py): no block
    is ever copied there, so a fault there gets a zero page."""
    runs = [(e.vaddr // PAGE, e.offset, e.pages) for e in pagemap.extents if e.lazy]
    if not wiped:
        return runs
    out = []
    cuts = [(a // PAGE, b // PAGE) for a, b in wiped]
    for page, off, count in runs:
        end = page + count
        i = bisect.bisect_right(cuts, (page, math.inf)) - 1
        i = max(i, 0)
        while page < end:
            while i < len(cuts) and cuts[i][1] <= page:
                i += 1
            if i == len(cuts) or cuts[i][0] >= end:
                out.append((page, off, end - page))
                break
            lo, hi = cuts[i]
            if lo > page:
                out.append((page, off, lo - page))
            skip = min(hi, end) - page
            page, off = page + skip, off + skip * PAGE
    return out

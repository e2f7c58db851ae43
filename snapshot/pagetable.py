"""Bookkeeping for a lazy restore: which block holds each missing page of each restored task.
Pure, no I/O (the page handler, lazypages.py, does the kernel side).

Pages are tracked per task as page number -> offset in the pages file; CRIU cuts nothing
smaller than a page and snapshot.files cuts pages files at page boundaries, so every page lies
in exactly one block.
"""
from __future__ import annotations

import bisect
from collections import defaultdict
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
            self.by_digest.setdefault(digest, []).append(len(self.digests))
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
    """One restored process's lazily mapped memory (threads share it)."""

    def __init__(self, name: str, fd: int, pages_file: str):
        self.name, self.fd, self.pages_file = name, fd, pages_file
        self.origin: dict[int, int] = {}  # page number -> pages-file offset, while mapped
        self.missing: dict[int, set[int]] = defaultdict(set)  # block key -> pages not yet in
        self.where: dict[int, int] = {}  # missing page -> its block key
        # block key -> its missing pages as copy runs (first page, offset in the block, pages),
        # as track_runs found them; dropped for a block whose pages change after (take()
        # then works them out page by page)
        self.runs: dict[int, list[tuple[int, int, int]]] = {}
        self.live = False  # its memory is registered (restore finished, or it faulted)
        self.last_key = -2  # block of the last fault, and how far ahead to read while the
        self.window = 0     # faults keep walking forward (as file readahead does)
        self.ahead: list[int] = []  # blocks read ahead of the walk, not yet passed by it

    def track(self, blocks: Blocks, pages: dict[int, int]) -> None:
        for page, off in pages.items():
            key, _ = blocks.key(self.pages_file, off)
            self.missing[key].add(page)
            self.where[page] = key
            self.runs.pop(key, None)
        self.origin.update(pages)

    def track_runs(self, blocks: Blocks, runs) -> None:
        """``track`` for runs of pages, (first page, pages-file offset, count): a block at a
        time, not a page at a time. A task's memory comes as a few hundred runs of a hundred
        thousand pages, and the restored tree's faults wait until it is tracked (the bench's
        snapshot, on an idle machine: 69 ms page by page, 36 ms by runs)."""
        first, starts = blocks.files[self.pages_file]
        size = starts[-1] + blocks.sizes[first + len(starts) - 1] if starts else 0
        for page, off, count in runs:
            end = off + count * PAGE
            if off < 0 or end > size:  # (the snapshot's pagemap and its pages file disagree)
                raise PageLayoutError(f"{self.pages_file}: pages at {off}..{end} lie outside its "
                                      f"{size} bytes")
            i = bisect.bisect_right(starts, off) - 1
            while off < end:
                stop = min(end, starts[i + 1]) if i + 1 < len(starts) else end
                pages = range(page, page + (stop - off) // PAGE)
                self.missing[first + i].update(pages)
                self.where.update(dict.fromkeys(pages, first + i))
                self.origin.update(zip(pages, range(off, stop, PAGE)))
                self.runs.setdefault(first + i, []).append((page, off - starts[i], len(pages)))
                page, off, i = pages.stop, stop, i + 1

    def mapped_in(self, first: int, last: int) -> list[int]:
        """Pages in [first, last) that hold snapshot memory. Events stall the process until read,
        so walk whichever is smaller: the range, or the pages."""
        if last - first < len(self.origin):
            return [p for p in range(first, last) if p in self.origin]
        return [p for p in self.origin if first <= p < last]

    def take(self, blocks: Blocks, key: int) -> list[tuple[int, int, int]]:
        """Block ``key``'s missing pages, to be copied in now (they are missing no more): runs
        of (first page, offset in the block, pages), each consecutive in memory and in the
        block. The runs track_runs recorded serve as they are; a block whose pages changed
        since (dropped, remapped, a fork's) is worked out page by page."""
        pages = self.missing.pop(key, None)
        runs = self.runs.pop(key, None)
        if not pages:
            return []
        for page in pages:
            self.where.pop(page, None)
        if runs is not None and sum(n for _, _, n in runs) == len(pages):
            return runs
        order = sorted(pages)
        _, start = blocks.key(self.pages_file, self.origin[order[0]])
        runs, i = [], 0
        while i < len(order):
            j = i + 1
            while (j < len(order) and order[j] == order[j - 1] + 1
                   and self.origin[order[j]] == self.origin[order[j - 1]] + PAGE):
                j += 1
            runs.append((order[i], self.origin[order[i]] - start, j - i))
            i = j
        return runs

    def drop(self, page: int) -> None:
        key = self.where.pop(page, None)
        if key is not None:
            self.missing[key].discard(page)
            self.runs.pop(key, None)
            if not self.missing[key]:
                del self.missing[key]


def lazy_runs(pagemap: PageMap) -> list[tuple[int, int, int]]:
    """The lazy pages as runs: (first page, pages-file offset, count)."""
    return [(e.vaddr // PAGE, e.offset, e.pages) for e in pagemap.extents if e.lazy]

"""snapshot.pagetable: which block holds each missing page of a restored task (pure)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from snapshot.criuimg import PAGE, Extent, PageMap
from snapshot.pagetable import Blocks, PageLayoutError, Task, lazy_runs


@st.composite
def layouts(draw):
    """A pages file cut into page-aligned blocks, and the memory extents stored in it."""
    block_pages = draw(st.lists(st.integers(1, 9), min_size=1, max_size=12))
    total = sum(block_pages)
    extents, off, vaddr = [], 0, draw(st.integers(0, 50)) * PAGE
    while off < total:
        n = draw(st.integers(1, total - off))
        extents.append(Extent(vaddr, n, off * PAGE, draw(st.booleans())))
        off += n
        vaddr += (n + draw(st.integers(0, 5))) * PAGE  # holes between mappings
    blocks = Blocks()
    blocks.add_file("pages-1.img", [(f"sha256:{i:064x}", n * PAGE) for i, n in enumerate(block_pages)])
    return blocks, PageMap(1, tuple(extents))


class PageByPage:
    """The page table as the handler once kept it, page by page: the model the runs must match."""

    def __init__(self, blocks, pages_file):
        self.blocks, self.pages_file = blocks, pages_file
        self.origin: dict[int, int] = {}  # page -> pages-file offset
        self.missing: set[int] = set()

    def track(self, runs):
        for page, off, count in runs:
            for i in range(count):
                self.origin[page + i] = off + i * PAGE
                self.missing.add(page + i)

    def key_of(self, page):
        return self.blocks.key(self.pages_file, self.origin[page])[0] if page in self.missing else None

    def drop(self, first, last):
        for page in [p for p in self.origin if first <= p < last]:
            del self.origin[page]
            self.missing.discard(page)

    def remap(self, old, new, n):
        moved = {p: self.origin.pop(p) for p in list(self.origin) if old <= p < old + n}
        gone = {p for p in moved if p in self.missing}
        self.missing -= gone
        self.drop(new, new + n)
        for p, off in moved.items():
            self.origin[p - old + new] = off
            if p in gone:
                self.missing.add(p - old + new)

    def take(self, key):
        pages = {p for p in self.missing if self.key_of(p) == key}
        self.missing -= pages
        _, start = self.blocks.key(self.pages_file, self.origin[min(pages)]) if pages else (0, 0)
        return {p: self.origin[p] - start for p in pages}


@settings(max_examples=300, deadline=None)
@given(layouts(), st.data())
def test_the_runs_answer_as_the_page_by_page_table_does(layout, data):
    """Tracked as runs, through drops (madvise, munmap), moves (mremap), blocks handed over and
    copies the kernel took only in part (put back):
    every page's block, each block's pages at their offsets in the block, and the count of pages
    still missing are what the page-by-page table gives; and the block really holds each page."""
    blocks, pagemap = layout
    task, model = Task("t", -1, pagemap.pages_file), PageByPage(blocks, pagemap.pages_file)
    task.track_runs(blocks, lazy_runs(pagemap))
    model.track(lazy_runs(pagemap))
    top = max([p + 1 for p in model.origin] + [1])
    for _ in range(data.draw(st.integers(0, 6))):
        op = data.draw(st.sampled_from(["drop", "remap", "take", "refused"]))
        if op == "drop":
            first = data.draw(st.integers(0, top))
            last = data.draw(st.integers(first, top + 2))
            task.drop(blocks, first, last)
            model.drop(first, last)
        elif op == "remap":
            old, n = data.draw(st.integers(0, top)), data.draw(st.integers(1, 8))
            new = data.draw(st.integers(old + n + 1, old + n + 40))  # (never overlapping, as mremap)
            task.remap(blocks, old, new, n)
            model.remap(old, new, n)
            top = max(top, new + n)
        elif task.missing:
            key = data.draw(st.sampled_from(sorted(task.missing)))
            got = {}
            task_runs = task.take(key)
            for page, off, count in task_runs:
                for i in range(count):
                    assert page + i not in got
                    got[page + i] = off + i * PAGE
            assert got == model.take(key)
            if op == "refused":  # the kernel took the runs up to a page, not the rest (EAGAIN)
                runs = task_runs
                i = data.draw(st.integers(0, len(runs) - 1))
                page, off, count = runs[i]
                k = data.draw(st.integers(0, count - 1))
                task.put_back(key, [(page + k, off + k * PAGE, count - k), *runs[i + 1:]])
                model.missing |= {p + j for p, _, n in [(page + k, 0, count - k), *runs[i + 1:]]
                                  for j in range(n)}
        for page in range(top + 2):
            assert task.key_of(blocks, page) == model.key_of(page)
        assert task.pages_missing == len(model.missing)
        assert set(task.missing) == {model.key_of(p) for p in model.missing}
    first, starts = blocks.files[pagemap.pages_file]
    for page, off, count in task.all_runs():  # and each page's bytes are where the block says
        for i in range(count):
            key, start = blocks.key(pagemap.pages_file, off + i * PAGE)
            assert start == starts[key - first] <= off + i * PAGE < start + blocks.sizes[key]


def test_runs_outside_the_pages_file_are_refused():
    """A pagemap that points past its pages file (or into an empty one) is a layout error, not
    pages mapped to some other block (whose bytes would then be copied from past its end)."""
    blocks = Blocks()
    blocks.add_file("pages-1.img", [("sha256:" + "a" * 64, 4 * PAGE), ("sha256:" + "b" * 64, 2 * PAGE)])
    blocks.add_file("pages-2.img", [])
    Task("ok", -1, "pages-1.img").track_runs(blocks, [(100, 0, 6)])
    with pytest.raises(PageLayoutError, match="outside"):
        Task("past", -1, "pages-1.img").track_runs(blocks, [(100, 4 * PAGE, 3)])
    with pytest.raises(PageLayoutError, match="outside"):
        Task("empty", -1, "pages-2.img").track_runs(blocks, [(100, 0, 1)])


def test_a_block_listed_at_two_sizes_is_refused():
    """One fetch, checked at one size, serves every key with its digest: listed at another size,
    a copy would run past the block's bytes into the server's own memory."""
    d = "sha256:" + "ab" * 32
    with pytest.raises(PageLayoutError, match="listed as"):
        Blocks().add_file("pages-1.img", [(d, 16 * 4096), (d, 64 * 4096)])
    blocks = Blocks()
    blocks.add_file("pages-1.img", [(d, 16 * 4096)])
    with pytest.raises(PageLayoutError, match="listed as"):
        blocks.add_file("pages-2.img", [(d, 8 * 4096)])
    blocks.add_file("pages-3.img", [(d, 16 * 4096)])  # (the same size again is one block twice)
    assert blocks.by_digest[d] == [0, 1]


def test_only_the_pages_files_criu_reads_are_served_as_memory():
    from snapshot.files import is_pages
    assert is_pages("criu/pages-1.img") and is_pages("criu/pages-12.img")
    for name in ("criu/x/pages-1.img", "pages-1.img", "upper/criu/pages-1.img", "criu/pagemap-1.img"):
        assert not is_pages(name), name


@settings(max_examples=300, deadline=None)
@given(layouts(), st.lists(st.tuples(st.integers(0, 120), st.integers(1, 12)), max_size=6))
def test_wiped_ranges_leave_the_lazy_runs_page_by_page(layout, cuts):
    """Memory a restore zeroes (wipe-on-fork) is cut out of the runs: every other lazy page
    keeps its pages-file offset, and no wiped page is left."""
    _, pagemap = layout
    wiped, at = [], 0
    for gap, n in cuts:  # sorted, disjoint, page-aligned [start, end) ranges
        wiped.append(((at + gap) * PAGE, (at + gap + n) * PAGE))
        at += gap + n
    gone = {p for a, b in wiped for p in range(a // PAGE, b // PAGE)}
    expect = {page + i: off + i * PAGE for page, off, count in lazy_runs(pagemap)
              for i in range(count) if page + i not in gone}
    got = {}
    for page, off, count in lazy_runs(pagemap, wiped):
        assert count > 0
        for i in range(count):
            assert page + i not in got
            got[page + i] = off + i * PAGE
    assert got == expect

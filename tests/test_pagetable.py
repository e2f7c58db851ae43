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


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_runs_are_tracked_as_page_by_page(layout):
    """The bulk table a task gets when criu restore hands it over equals the page-at-a-time one:
    the same block for every lazy page, the same pages missing per block, the same offsets."""
    blocks, pagemap = layout
    by_page = Task("a", -1, pagemap.pages_file)
    by_page.track(blocks, {e.vaddr // PAGE + i: e.offset + i * PAGE
                           for e in pagemap.extents if e.lazy for i in range(e.pages)})
    by_run = Task("b", -1, pagemap.pages_file)
    by_run.track_runs(blocks, lazy_runs(pagemap))
    assert by_run.where == by_page.where
    assert by_run.origin == by_page.origin
    assert dict(by_run.missing) == dict(by_page.missing)
    for page, key in by_run.where.items():  # and the block really holds the page's bytes
        first, starts = blocks.files[pagemap.pages_file]
        start = starts[key - first]
        assert start <= by_run.origin[page] < start + blocks.sizes[key]


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


@settings(max_examples=300, deadline=None)
@given(layouts(), st.data())
def test_a_block_is_handed_over_as_runs_that_cover_exactly_its_missing_pages(layout, data):
    """take(): whether the runs come as track_runs recorded them or are worked out again after
    pages were dropped or tracked one by one (a remap), they cover exactly the block's missing
    pages, each at its offset in the block, and leave none of them missing."""
    blocks, pagemap = layout
    task = Task("t", -1, pagemap.pages_file)
    task.track_runs(blocks, lazy_runs(pagemap))
    for page in data.draw(st.lists(st.sampled_from(sorted(task.where) or [0]), max_size=8)):
        task.drop(page)  # (madvise, munmap: gone from the runs of its block)
    moved = data.draw(st.lists(st.sampled_from(sorted(task.origin) or [0]), max_size=4, unique=True))
    for page in moved:  # a page tracked again, one by one (what a remap does), at a new address
        if page in task.where:
            task.drop(page)
            task.track(blocks, {page + 10_000: task.origin[page]})
    first, starts = blocks.files[pagemap.pages_file]
    for key in sorted(task.missing):
        expected = {page: task.origin[page] - starts[key - first]
                    for page, k in task.where.items() if k == key}
        got = {}
        for page, off, count in task.take(blocks, key):
            assert count > 0
            for i in range(count):
                assert page + i not in got
                got[page + i] = off + i * PAGE
        assert got == expected
        assert key not in task.missing and not any(k == key for k in task.where.values())
    assert not task.where

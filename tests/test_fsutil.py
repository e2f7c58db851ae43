"""Durable atomic writes that leave nothing in the page cache, and reading back what the page cache
holds of a file (how a learning mount tells the blocks the kernel read from those it only fetched)."""
from __future__ import annotations

import os

import pytest

from lazyfs.fsutil import atomic_write
from lazyfs.proc.syscalls import cached_pages


def test_written_pages_are_dropped_and_a_read_brings_them_back(tmp_path):
    (tmp_path / "tmp").mkdir()
    target = tmp_path / "block"
    atomic_write(target, os.urandom(200_000), tmp_path / "tmp", durable=True, drop_pages=True)
    if cached_pages(target) is None:
        pytest.skip("cachestat(2) is not available on this kernel (Linux 6.5+)")
    assert cached_pages(target) == 0
    with open(target, "rb") as f:
        f.read(4096)
    assert cached_pages(target) > 0
    atomic_write(target, b"kept", tmp_path / "tmp", durable=True)
    assert cached_pages(target) > 0  # without drop_pages, what was written stays cached
    assert cached_pages(tmp_path / "gone") == 0

"""LocalStore specifics: atomic writes and refusing directories that are not stores."""
from __future__ import annotations

import os

import pytest

from lazyfs.errors import StoreError
from lazyfs.format import block
from lazyfs.store.local import LocalStore


def test_crash_during_write_leaves_no_object(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "s")
    digest, frame = block.encode(b"x" * 1000)
    store.put_block(*block.encode(b"warm up"))

    def crash(fd):
        raise OSError(5, "simulated power cut")
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(Exception):
        store.put_block(digest, frame)
    monkeypatch.undo()
    assert not store.has_block(digest)
    assert list((tmp_path / "s" / "tmp").iterdir()) == []


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a lazyfs store"):
        LocalStore(tmp_path / "notastore").put_block(*block.encode(b"a"))
    assert (tmp_path / "notastore" / "precious.txt").read_text() == "keep me"


def test_store_path_that_is_a_file_fails_early(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        LocalStore(tmp_path / "file").check(write=True)


def test_put_blocks_interrupted_leaves_no_temp_and_no_partial(tmp_path):
    store = LocalStore(tmp_path / "s")
    blocks = [block.encode(bytes([i]) * 5000) for i in range(5)]

    def frames():
        yield from blocks[:3]
        raise RuntimeError("source died mid-commit")
    with pytest.raises(RuntimeError):
        list(store.put_blocks(frames()))
    assert list((tmp_path / "s" / "tmp").iterdir()) == []
    for digest, frame in blocks[:3]:
        assert not store.has_block(digest) or store.get_block(digest) == frame

"""LocalStore specifics: atomic writes and refusing directories that are not stores."""
from __future__ import annotations

import os
import shutil

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


def test_remove_if_unused_takes_back_only_an_unused_store_it_made(tmp_path):
    # A store made with its parents, then left unused: all of it goes, the parents too.
    made = LocalStore(tmp_path / "a" / "b" / "store")
    made.check(write=True)
    made.put_lease("build-1", b"{}")
    made.delete_lease("build-1")
    made.remove_if_unused()
    assert list(tmp_path.iterdir()) == []
    # An empty directory given as the store stays, emptied of what the store put in it.
    (tmp_path / "empty").mkdir()
    empty = LocalStore(tmp_path / "empty")
    empty.check(write=True)
    empty.remove_if_unused()
    assert (tmp_path / "empty").is_dir() and list((tmp_path / "empty").iterdir()) == []
    # Another process holds a lease in it, or an object is already there: it stays.
    for use in (lambda other: other.put_lease("build-2", b"{}"),
                lambda other: other.put_block(*block.encode(b"kept"))):
        mine = LocalStore(tmp_path / "shared")
        mine.check(write=True)
        use(LocalStore(tmp_path / "shared"))
        mine.remove_if_unused()
        assert (tmp_path / "shared" / "lazyfs-store.json").exists()
        LocalStore(tmp_path / "shared").check()  # still a store
        shutil.rmtree(tmp_path / "shared")
    # A store that was there before is never this object's to remove.
    LocalStore(tmp_path / "old").check(write=True)
    old = LocalStore(tmp_path / "old")
    old.check(write=True)
    old.remove_if_unused()
    assert (tmp_path / "old" / "lazyfs-store.json").exists()

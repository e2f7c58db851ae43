"""Storing a snapshot's files as blocks (snapshot.files.publish), without CRIU: the files come back
byte for byte and in order, memory holding floats is stored shuffled and the rest as it is, and a
store that fails partway stops the encoding threads."""
from __future__ import annotations

import os
import random
import struct
import threading
import time

import pytest

from lazyfs.errors import StoreUnavailable
from lazyfs.format import block
from lazyfs.store.local import LocalStore
from snapshot import files

NAMES = ["criu/core-1.img", "criu/pages-1.img", "criu/empty.img", "upper.tar"]


@pytest.fixture
def snapshot_dir(tmp_path):
    root = tmp_path / "snap"
    (root / "criu").mkdir(parents=True)
    rng = random.Random(5)
    floats = struct.pack("<262144f", *(rng.gauss(0, 0.02) for _ in range(262144)))  # 1 MiB
    (root / "criu" / "pages-1.img").write_bytes(floats + rng.randbytes(1 << 20))
    (root / "criu" / "core-1.img").write_bytes(b"core " * 1000)
    (root / "criu" / "empty.img").write_bytes(b"")
    (root / "upper.tar").write_bytes(b"".join(b"line %d of the layer\n" % i for i in range(90_000)))
    return root


def _objects(store: LocalStore, snap_files) -> dict[str, bytes]:
    return {d: store.get_block(d) for f in snap_files for d, _ in f.chunks}


def test_files_come_back_in_order_and_memory_of_floats_is_stored_shuffled(snapshot_dir, tmp_path):
    store = LocalStore(str(tmp_path / "store"))
    seen = []
    snap_files, new, total = files.publish(store, snapshot_dir, NAMES, seen.append)
    assert [f.name for f in snap_files] == NAMES
    assert sum(seen) == sum((snapshot_dir / n).stat().st_size for n in NAMES)  # the progress
    objects = _objects(store, snap_files)
    for f in snap_files:
        content = (snapshot_dir / f.name).read_bytes()
        assert f.size == len(content) == sum(n for _, n in f.chunks)
        assert b"".join(block.decode(d, objects[d], expected_size=n) for d, n in f.chunks) == content
    assert snap_files[2].chunks == ()
    pages = [objects[d] for d, _ in snap_files[1].chunks]
    assert any(o.startswith(block.SHUFFLED) for o in pages)  # the floats
    assert not all(o.startswith(block.SHUFFLED) for o in pages)  # the random bytes
    others = [objects[d] for f in snap_files if f.name != "criu/pages-1.img" for d, _ in f.chunks]
    assert others and not any(o.startswith(block.SHUFFLED) for o in others)
    assert new == total == sum(len(o) for o in objects.values())
    # Published again: every block is already there.
    again, new2, total2 = files.publish(store, snapshot_dir, NAMES)
    assert again == snap_files and new2 == 0 and total2 == total
    # Fetched back whole (an eager restore), with its progress in bytes.
    ticks: list[int] = []
    out = tmp_path / "fetched"
    fetched = files.fetch(lambda d, n: block.decode(d, objects[d], expected_size=n), snap_files, out,
                          tick=ticks.append)
    assert fetched == sum(ticks) == sum(f.size for f in snap_files)
    assert all((out / n).read_bytes() == (snapshot_dir / n).read_bytes() for n in NAMES)


class _FailingStore(LocalStore):
    """Takes two blocks, then loses its connection."""

    def put_blocks(self, items):
        for n, (digest, frame) in enumerate(items):
            if n == 2:
                raise StoreUnavailable("the store went away")
            self.put_block(digest, frame)
            yield digest, True


def _encoders() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("snapshot-encode")]


def test_a_store_failing_partway_stops_the_encoders(snapshot_dir, tmp_path):
    store = _FailingStore(str(tmp_path / "store"))
    with pytest.raises(StoreUnavailable, match="went away"):
        files.publish(store, snapshot_dir, NAMES)
    deadline = time.monotonic() + 10
    while _encoders() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _encoders()


def test_a_file_gone_before_it_is_read_is_an_error_not_a_short_snapshot(snapshot_dir, tmp_path):
    os.unlink(snapshot_dir / "upper.tar")
    with pytest.raises(FileNotFoundError):
        files.publish(LocalStore(str(tmp_path / "store")), snapshot_dir, NAMES)

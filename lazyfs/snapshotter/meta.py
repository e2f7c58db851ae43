"""The snapshots containerd asked for, kept in one SQLite file under the snapshotter's root.

Every change is one transaction, committed before the answer goes back, so a snapshotter killed
at any point restarts with exactly the snapshots containerd was told exist. The layout mirrors
containerd's own overlay snapshotter: a snapshot has a number (``id``), which names its
directory (``snapshots/ID/fs`` and ``work``), and a key (active and view snapshots) or name
(committed ones), which is how containerd names it; committing keeps the number and renames.

A committed snapshot lazyfs serves has ``image`` set: the lazyfs image holding its chain's whole
content (lazyfs.format.chain), and no directory. A snapshot that needs a lazyfs mount (one such
image among its ancestors) holds an agent ``lease`` on it for as long as it exists.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from lazyfs.errors import SnapshotConflict, SnapshotInvalid, SnapshotExists, SnapshotNotFound

# containerd.services.snapshots.v1.Kind
VIEW, ACTIVE, COMMITTED = 1, 2, 3
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}
MAX_KEY = 4096
MAX_LABELS = 64 << 10  # bytes of a snapshot's labels, encoded


@dataclass(frozen=True)
class Info:
    id: int
    name: str
    kind: int
    parent: str = ""
    labels: dict = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    image: str = ""  # committed snapshots lazyfs serves: the lazyfs image of the whole chain
    lease: str = ""  # the node agent's lease on the mount this snapshot's lower needs


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    parent TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    image TEXT NOT NULL DEFAULT '',
    lease TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS by_parent ON snapshots(parent);
"""
_COLUMNS = "id, name, kind, parent, labels, created, updated, image, lease"


def _row(row) -> Info:
    return Info(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5], row[6], row[7], row[8])


def check_labels(labels: dict) -> dict:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise SnapshotInvalid("snapshot labels must map strings to strings")
    if len(json.dumps(labels)) > MAX_LABELS:
        raise SnapshotInvalid(f"snapshot labels over {MAX_LABELS} bytes")
    return dict(labels)


class MetaStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used under a lock: gRPC serves requests on a pool of threads.
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.lock = threading.RLock()

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator["MetaStore"]:
        """All changes inside happen, or none (an exception rolls them back)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def find(self, name: str) -> Info | None:
        with self.lock:
            row = self.db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE name = ?", (name,)).fetchone()
        return _row(row) if row else None

    def get(self, name: str) -> Info:
        info = self.find(name)
        if info is None:
            raise SnapshotNotFound(f"snapshot {name!r} does not exist")
        return info

    def create(self, name: str, kind: int, parent: str, labels: dict, image: str = "") -> Info:
        if not name or len(name) > MAX_KEY:
            raise SnapshotInvalid(f"a snapshot key must be 1 to {MAX_KEY} characters")
        if self.find(name) is not None:
            raise SnapshotExists(f"snapshot {name!r} already exists")
        if parent and self.get(parent).kind != COMMITTED:
            raise SnapshotInvalid(f"parent {parent!r} is not a committed snapshot")
        now = time.time()
        with self.lock:
            self.db.execute(
                "INSERT INTO snapshots (name, kind, parent, labels, created, updated, image) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (name, kind, parent, json.dumps(check_labels(labels)),
                                                 now, now, image))
        return self.get(name)

    def commit(self, key: str, name: str, labels: dict) -> Info:
        """The active snapshot ``key`` becomes the committed ``name`` (same number, same files)."""
        active = self.get(key)
        if active.kind != ACTIVE:
            raise SnapshotConflict(f"snapshot {key!r} is {KIND_NAMES[active.kind]}, not active: only "
                                   "an active snapshot can be committed")
        if self.find(name) is not None:
            raise SnapshotExists(f"snapshot {name!r} already exists")
        with self.lock:
            self.db.execute("UPDATE snapshots SET name = ?, kind = ?, labels = ?, updated = ? WHERE id = ?",
                            (name, COMMITTED, json.dumps(check_labels(labels)), time.time(), active.id))
        return self.get(name)

    def set(self, info: Info, **changes) -> Info:
        new = replace(info, **changes, updated=time.time())
        with self.lock:
            self.db.execute("UPDATE snapshots SET labels = ?, updated = ?, lease = ? WHERE id = ?",
                            (json.dumps(check_labels(new.labels)), new.updated, new.lease, info.id))
        return new

    def committed_on(self, parent: str) -> list[Info]:
        """The committed snapshots whose parent is ``parent`` (by the index, not a scan)."""
        with self.lock:
            return [_row(r) for r in self.db.execute(
                f"SELECT {_COLUMNS} FROM snapshots WHERE parent = ? AND kind = ?", (parent, COMMITTED))]

    def children(self, name: str) -> list[str]:
        with self.lock:
            return [r[0] for r in self.db.execute("SELECT name FROM snapshots WHERE parent = ?", (name,))]

    def delete(self, info: Info) -> None:
        with self.lock:
            self.db.execute("DELETE FROM snapshots WHERE id = ?", (info.id,))

    def all(self) -> list[Info]:
        with self.lock:
            return [_row(r) for r in self.db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id")]

    def ancestry(self, info: Info) -> list[Info]:
        """``info``'s parent, its parent, … up to the first lazyfs-served one (which holds
        everything below it) or the base layer."""
        out: list[Info] = []
        while info.parent:
            info = self.get(info.parent)
            out.append(info)
            if info.image:
                break
        return out

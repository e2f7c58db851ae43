"""A store in a local directory (the embedded default). Layout in docs/format.md, "Local store".

Every write goes to ``tmp/`` first, is fsynced, then renamed into place: a crash leaves at most a
stray temp file, never a partial object under its final name.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator

from lazyfs.errors import (BlockNotFound, ManifestNotFound, StoreError, StoreUnavailable,
                           TagNotFound)
from lazyfs.format import digest as digests
from lazyfs.format import reference
from lazyfs.fsutil import atomic_write
from lazyfs.store import lease
from lazyfs.store.base import ObjectInfo, get_blocks_one_by_one

MARKER = "lazyfs-store.json"
BATCH = 512  # blocks per syncfs in put_blocks
LAYOUT_NAMES = {MARKER, "tmp", "blocks", "manifests", "tags", "leases"}
LAYOUT_VERSION = 1


def _syncfs_fn():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _syncfs_fn()


def syncfs(directory: Path) -> None:
    """Flush one filesystem (one call for a whole batch instead of an fsync per file)."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


class LocalStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self._blocks = str(self.root / "blocks" / "sha256")
        self.url = f"file://{self.root}"
        self._ready = False
        self._lock = threading.Lock()
        # Directories this object created for a new store, outermost first (remove_if_unused).
        self._created: list[Path] | None = None

    # -- layout ----------------------------------------------------------------------------------
    def _block_file(self, digest: str) -> str:
        # (os.path, not pathlib: a lazy restore reads hundreds of blocks a second through here)
        hexd = digests.hex_part(digest)
        return os.path.join(self._blocks, hexd[:2], hexd)

    def _block_path(self, digest: str) -> Path:
        return Path(self._block_file(digest))

    def _manifest_path(self, digest: str) -> Path:
        return self.root / "manifests" / "sha256" / digests.hex_part(digest)

    def _tag_path(self, name: str, tag: str) -> Path:
        # ':' never appears in a name component, so tag files cannot collide with nested names.
        ref = reference.parse(f"{name}:{tag}")
        return self.root / "tags" / ref.name / f":{ref.tag}"

    def _prepare(self) -> None:
        if self._ready:
            return
        with self._lock:
            self._prepare_locked()

    def initialised(self) -> bool:
        """Whether a store has been made here (a reader of a path where none is sees it empty)."""
        return (self.root / MARKER).is_file()

    def check(self, write: bool = False) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store {self.root} is not a directory")
        if write:
            self._prepare()
            if not os.access(self.root / "tmp", os.W_OK):
                raise StoreUnavailable(f"store {self.root} is not writable by this user")

    def _prepare_locked(self) -> None:
        try:
            self._init_layout()
        except OSError as exc:
            raise StoreUnavailable(f"cannot use store {self.root}: {exc.strerror}") from None

    def _init_layout(self) -> None:
        marker = self.root / MARKER
        if not marker.exists():
            # Another process may be initialising the same store: its layout names are fine.
            if self.root.exists() and any(p.name not in LAYOUT_NAMES for p in self.root.iterdir()):
                raise StoreError(f"{self.root} exists and is not a lazyfs store (no {MARKER})")
            missing = [d for d in (self.root, *self.root.parents) if not d.exists()][::-1]
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(exist_ok=True)
            atomic_write(marker, json.dumps({"layout": LAYOUT_VERSION}).encode(), self.root / "tmp")
            self._created = missing
        else:
            layout = json.loads(marker.read_text()).get("layout")
            if layout != LAYOUT_VERSION:
                raise StoreError(f"{self.root}: store layout {layout} is not supported")
            (self.root / "tmp").mkdir(exist_ok=True)
        self._ready = True

    def _put(self, path: Path, data: bytes) -> bool:
        self._prepare()
        if self._refresh(path):
            return False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data, self.root / "tmp")
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {path}: {os.strerror(exc.errno or errno.EIO)}") from exc
        return True

    @staticmethod
    def _refresh(path: Path) -> bool:
        """True when the object is already stored. Reuse refreshes the age gc judges by, so a
        block a build is about to reference is never the oldest garbage in the store."""
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    @staticmethod
    def _read(path: str | Path, missing: Exception) -> bytes:
        try:
            with open(path, "rb", buffering=0) as f:
                return f.readall()
        except FileNotFoundError:
            raise missing from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {path}: {exc.strerror}") from exc

    # -- blocks ----------------------------------------------------------------------------------
    def has_block(self, digest: str) -> bool:
        return self._block_path(digest).exists()

    def block_size(self, digest: str) -> int | None:
        try:
            return self._block_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def get_block(self, digest: str) -> bytes:
        return self._read(self._block_file(digest), BlockNotFound(digest))

    def get_blocks(self, wanted: list[str]) -> Iterator[tuple[str, bytes | None]]:
        return get_blocks_one_by_one(self, wanted)

    def put_block(self, digest: str, frame: bytes) -> bool:
        return self._put(self._block_path(digest), frame)

    def put_blocks(self, items: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, bool]]:
        """Store many blocks, yielding (digest, newly stored) as each becomes durable.

        Same guarantee as put_block (no partial object under a final name) at a fraction of the
        cost: a batch of temp files is flushed with one syncfs before any is renamed, and the
        renames are flushed before the batch is reported, so a manifest written afterwards never
        refers to a block a crash could lose."""
        self._prepare()
        batch: list[tuple[str, Path, str]] = []
        try:
            # (only the store's own steps are _writing(): an error of the caller's items, say a
            # file gone that it was reading, is the caller's, and passes on as it is)
            for digest, frame in items:
                with self._writing():
                    path = self._block_path(digest)
                    there = self._refresh(path)
                    if not there:
                        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix=".part-")
                        batch.append((digest, path, tmp))
                        with os.fdopen(fd, "wb") as f:
                            f.write(frame)
                if there:
                    yield digest, False
                elif len(batch) >= BATCH:
                    yield from self._publish(batch)
                    batch = []
            yield from self._publish(batch)
            batch = []
        finally:
            for _, _, tmp in batch:  # an error or an abandoned iteration: leave no temp files
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def _publish(self, batch: list[tuple[str, Path, str]]) -> Iterator[tuple[str, bool]]:
        if not batch:
            return
        with self._writing():
            syncfs(self.root / "tmp")
            for _, path, tmp in batch:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, path)
            syncfs(self.root / "tmp")
        done = [digest for digest, _, _ in batch]
        batch.clear()
        for digest in done:
            yield digest, True

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise StoreUnavailable(f"cannot write blocks to {self.root}: {exc.strerror}") from exc

    def list_blocks(self) -> Iterator[ObjectInfo]:
        base = Path(self._blocks)
        if base.is_dir():
            for sub in sorted(base.iterdir()):
                yield from self._list(sub)

    def _list(self, directory: Path) -> Iterator[ObjectInfo]:
        if not directory.is_dir():
            return
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if digests.is_valid("sha256:" + entry.name):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo("sha256:" + entry.name, st.st_size, st.st_mtime)

    def delete_block(self, digest: str) -> None:
        self._block_path(digest).unlink(missing_ok=True)

    # -- manifests and tags ------------------------------------------------------------------
    def get_manifest(self, digest: str) -> bytes:
        return self._read(self._manifest_path(digest), ManifestNotFound(digest))

    def put_manifest(self, digest: str, frame: bytes) -> bool:
        return self._put(self._manifest_path(digest), frame)

    def list_manifests(self) -> Iterator[ObjectInfo]:
        yield from self._list(self.root / "manifests" / "sha256")

    def delete_manifest(self, digest: str) -> None:
        self._manifest_path(digest).unlink(missing_ok=True)

    def get_tag(self, name: str, tag: str) -> str:
        data = self._read(self._tag_path(name, tag), TagNotFound(f"{name}:{tag}", self.url))
        value = data.decode("ascii", "replace").strip()
        if not digests.is_valid(value):
            raise StoreError(f"tag {name}:{tag} in {self.root} is corrupt: {value[:80]!r}")
        return value

    def put_tag(self, name: str, tag: str, digest: str) -> None:
        digests.validate(digest)
        self._prepare()
        path = self._tag_path(name, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, (digest + "\n").encode(), self.root / "tmp")

    def list_tags(self) -> list[tuple[str, str, str]]:
        base = self.root / "tags"
        out = []
        if base.is_dir():
            for path in base.rglob(":*"):
                name = path.parent.relative_to(base).as_posix()
                tag = path.name[1:]
                out.append((name, tag, self.get_tag(name, tag)))
        return sorted(out)

    # -- leases ------------------------------------------------------------------------------
    def _lease_path(self, name: str) -> Path:
        return self.root / "leases" / lease.check_name(name)

    def put_lease(self, name: str, data: bytes) -> None:
        self._prepare()
        path = self._lease_path(name)
        path.parent.mkdir(exist_ok=True)
        atomic_write(path, data, self.root / "tmp")

    def list_leases(self) -> list[tuple[str, bytes]]:
        base = self.root / "leases"
        out = []
        if base.is_dir():
            for p in sorted(base.iterdir()):
                try:
                    out.append((p.name, p.read_bytes()))
                except FileNotFoundError:
                    continue
        return out

    def delete_lease(self, name: str) -> None:
        self._lease_path(name).unlink(missing_ok=True)

    def remove_if_unused(self) -> None:
        """Take back the store this object created, if nothing was put in it since: a build that
        fails leaves no trace of a store it made. rmdir, never a recursive delete, so a store
        another process has begun to use (its lease, its temp file, any object) stays."""
        if self._created is None:
            return
        with self._lock:
            try:
                self._remove_unused()
            except OSError:
                pass  # what could not go stays; the build's own error is the one to report

    def _remove_unused(self) -> None:
        if any((self.root / sub).exists() for sub in ("blocks", "manifests", "tags")):
            return
        for sub in ("leases", "tmp"):
            try:
                (self.root / sub).rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                return  # not empty: another process uses the store (a lease, a temp file)
        if [p.name for p in self.root.iterdir()] != [MARKER]:
            return
        (self.root / MARKER).unlink()
        self._created, created = None, self._created
        self._ready = False
        for d in reversed(created):  # the store's root and the parents made for it, innermost first
            d.rmdir()

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

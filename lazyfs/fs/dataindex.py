"""The data namespace a kernel-path mount serves through FUSE: ``/<id[:2]>/<id>`` for every data
object of the image (lazyfs.format.dataobj), nothing else.

overlayfs looks an object up here only when no local data layer has it, so this is where the
missing bytes of an image come from, fetched chunk by chunk as reads ask for them. The image's own
paths stay in ``by_path``/``children`` (ImageIndex) for the sibling heuristic; ``lookup`` sees only
the data namespace. Inode numbers: 1 for the root, 2 + the prefix's value for the 256 fan-out
directories, 258 + the manifest index for an object, so none means two things.
"""
from __future__ import annotations

import logging
import threading
from functools import cached_property
from typing import Callable

from lazyfs.errors import StoreUnavailable
from lazyfs.format import dataobj
from lazyfs.format.manifest import Entry, EntryType, Manifest, hardlinks
from lazyfs.fs.index import ImageIndex, Inode

log = logging.getLogger("lazyfs.mount")
_HEX = "0123456789abcdef"
ROOT = Inode(1, Entry(b"", EntryType.DIR, 0o555), 2)
FANOUT = {f"{a}{b}".encode(): Inode(2 + int(a + b, 16), Entry(f"{a}{b}".encode(), EntryType.DIR,
                                                               0o555), 2)
          for a in _HEX for b in _HEX}
OBJECT_INO_BASE = 2 + len(FANOUT)


def static_dir(path: bytes) -> Inode | None:
    """The root and the fan-out directories: known without the manifest."""
    return ROOT if path == b"" else FANOUT.get(path)


class DataIndex(ImageIndex):
    """Built on a kernel-path mount's start path, where the kernel may be waiting for its first
    object (criu restore opening the libraries it maps): one pass that keys each object to the
    first entry with its content. Inodes are made as the kernel looks objects up, the fan-out
    listings if something lists them, and the image's own paths (``by_path``/``children``, for
    the sibling heuristic) on first use: none of it is needed to serve an object. (The bench's
    torch image, 30,000 entries: 0.02 s for this pass, against 0.08 s making every inode and
    listing up front, on the same two cores a cold restore's criu and page server use.)"""

    def __init__(self, manifest: Manifest):  # (not ImageIndex.__init__: the paths wait)
        self.manifest = manifest
        REG = EntryType.REG
        keys: dict[bytes, int] = {}  # "ab/abcd…" -> index of the first entry with that content
        total = 0
        for i, e in enumerate(manifest.entries):
            if e.type is REG:
                total += e.size
                if e.size:
                    oid = dataobj.object_id(e.chunks, decoded=True)
                    keys.setdefault(dataobj.relpath(oid).encode(), i)
        self._keys = keys
        self._links = hardlinks(manifest.entries)  # path -> its HARDLINK names
        self._inodes: dict[int, Inode] = {}  # entry index -> its inode, once looked up
        self.oids: dict[int, str] = {}  # ino -> object id, of the inodes made
        self.total_size = total

    def _inode(self, key: bytes, i: int) -> Inode:
        inode = self._inodes.get(i)
        if inode is None:
            e = self.manifest.entries[i]
            inode = self._inodes.setdefault(i, Inode(i + 1, e, 1 + self._links.get(e.path, 0)))
            self.oids[inode.ino] = key[3:].decode()
        return inode

    @cached_property
    def listing(self) -> dict[int, list[tuple[bytes, Inode]]]:
        out: dict[int, list[tuple[bytes, Inode]]] = {ROOT.ino: sorted(FANOUT.items())}
        for key, i in self._keys.items():
            out.setdefault(FANOUT[key[:2]].ino, []).append((key[3:], self._inode(key, i)))
        return out

    @cached_property
    def _paths(self) -> ImageIndex:
        return ImageIndex(self.manifest)

    @property
    def by_path(self) -> dict[bytes, Inode]:
        return self._paths.by_path

    @property
    def children(self) -> dict[int, list[bytes]]:
        return self._paths.children

    def lookup(self, path: bytes) -> Inode | None:
        i = self._keys.get(path)
        return static_dir(path) if i is None else self._inode(path, i)

    def listdir(self, inode: Inode) -> list[tuple[bytes, Inode]]:
        return self.listing.get(inode.ino, [])

    def stat(self, inode: Inode) -> dict:
        out = ImageIndex.stat(inode)
        if inode.ino in self.oids:
            out["st_ino"] = OBJECT_INO_BASE + inode.ino - 1
        return out

    def object_of(self, inode: Inode) -> str | None:
        return self.oids.get(inode.ino)


class DeferredIndex:
    """A DataIndex built in the background. On the kernel path the kernel answers all metadata
    from the EROFS image, so the daemon can answer the mount before it has decoded the manifest;
    a request that needs an object waits until the index is there (or fails, if it never is)."""

    def __init__(self, build: Callable[[], DataIndex]):
        self._index: DataIndex | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._run, args=(build,), name="lazyfs-index", daemon=True).start()

    def _run(self, build) -> None:
        try:
            self._index = build()
        except BaseException as exc:  # reported on every request that needed it
            self._error = exc
            log.error("cannot load the image's manifest: %s", exc)
        finally:
            self._ready.set()

    def get(self) -> DataIndex:
        self._ready.wait()
        if self._index is None:
            raise StoreUnavailable(f"the image's manifest could not be loaded: {self._error}")
        return self._index

    def lookup(self, path: bytes) -> Inode | None:
        found = static_dir(path)
        return found if found is not None else self.get().lookup(path)

    def stat(self, inode: Inode) -> dict:
        return ImageIndex.stat(inode) if self._index is None else self._index.stat(inode)

    @property
    def total_size(self) -> int:
        return self._index.total_size if self._index else 0

    @property
    def entry_count(self) -> int:
        return self._index.entry_count if self._index else 0

    def __getattr__(self, name: str):
        return getattr(self.get(), name)

"""The data namespace a kernel-path mount serves through FUSE: ``/<id[:2]>/<id>`` for every data
object of the image (lazyfs.format.dataobj), nothing else.

overlayfs looks an object up here only when no local data layer has it, so this is where the
missing bytes of an image come from, fetched chunk by chunk as reads ask for them. The image's own
paths stay in ``by_path``/``children`` (ImageIndex) for the sibling heuristic; ``lookup`` sees only
the data namespace.
"""
from __future__ import annotations

from lazyfs.format import dataobj
from lazyfs.format.manifest import Entry, EntryType, Manifest
from lazyfs.fs.index import ImageIndex, Inode


class DataIndex(ImageIndex):
    def __init__(self, manifest: Manifest):
        super().__init__(manifest)
        self.objects: dict[bytes, Inode] = {}  # "ab/abcd…" -> the first inode with that content
        self.oids: dict[int, str] = {}  # ino -> object id
        fanout: dict[bytes, list[bytes]] = {}
        for inode in self.by_path.values():
            e = inode.entry
            if e.type != EntryType.REG or not e.size or inode.ino in self.oids:
                continue
            oid = dataobj.object_id(e.chunks)
            self.oids[inode.ino] = oid
            key = dataobj.relpath(oid).encode()
            if key not in self.objects:
                self.objects[key] = inode
                fanout.setdefault(key[:2], []).append(key[3:])
        # Directory inodes after the image's own numbers, so no number means two things.
        base = len(manifest.entries) + 1
        root = self.by_path[b""].entry
        self.root = Inode(base, Entry(b"", EntryType.DIR, 0o555, mtime_ns=root.mtime_ns), 2)
        self.dirs: dict[bytes, Inode] = {b"": self.root}
        self.listing: dict[int, list[tuple[bytes, Inode]]] = {base: []}
        for n, (head, names) in enumerate(sorted(fanout.items()), start=1):
            d = Inode(base + n, Entry(head, EntryType.DIR, 0o555, mtime_ns=root.mtime_ns), 2)
            self.dirs[head] = d
            self.listing[base].append((head, d))
            self.listing[d.ino] = [(name, self.objects[head + b"/" + name]) for name in names]

    def lookup(self, path: bytes) -> Inode | None:
        return self.objects.get(path) or self.dirs.get(path)

    def listdir(self, inode: Inode) -> list[tuple[bytes, Inode]]:
        return self.listing.get(inode.ino, [])

    def object_of(self, inode: Inode) -> str | None:
        return self.oids.get(inode.ino)

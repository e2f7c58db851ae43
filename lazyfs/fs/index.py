"""All metadata of a mounted image, built once from the manifest: nothing here ever fetches.

Inode numbers are the manifest index of the entry that holds the inode, plus one, so they are the
same on every mount of the same manifest; hardlinks share their target's inode.
"""
from __future__ import annotations

import bisect
import os
import stat as st
from dataclasses import dataclass

from lazyfs.format.manifest import Entry, EntryType, Manifest, link_counts

_FMT = {EntryType.REG: st.S_IFREG, EntryType.DIR: st.S_IFDIR, EntryType.SYMLINK: st.S_IFLNK,
        EntryType.CHR: st.S_IFCHR, EntryType.BLK: st.S_IFBLK, EntryType.FIFO: st.S_IFIFO,
        EntryType.SOCK: st.S_IFSOCK}


@dataclass(slots=True)
class Inode:
    ino: int
    entry: Entry  # the entry holding the metadata (never a HARDLINK)
    nlink: int
    offsets: list[int] | None = None  # chunk start offsets, built on first read

    def chunk_offsets(self) -> list[int]:
        if self.offsets is None:
            offs, pos = [], 0
            for c in self.entry.chunks:
                offs.append(pos)
                pos += c.size
            self.offsets = offs
        return self.offsets

    def chunks_for(self, offset: int, length: int):
        """Yield (chunk, offset within chunk, length) covering [offset, offset+length)."""
        end = min(offset + length, self.entry.size)
        offs = self.chunk_offsets()
        i = bisect.bisect_right(offs, offset) - 1
        pos = offset
        while pos < end and i < len(offs):
            chunk = self.entry.chunks[i]
            inner = pos - offs[i]
            n = min(chunk.size - inner, end - pos)
            yield chunk, inner, n
            pos += n
            i += 1


    def chunks_after(self, end: int, n: int):
        """Up to n chunks following the one that holds byte ``end - 1`` (readahead candidates)."""
        if end >= self.entry.size or not self.entry.chunks:
            return ()
        offs = self.chunk_offsets()
        i = bisect.bisect_right(offs, end - 1)
        return self.entry.chunks[i:i + n]


class ImageIndex:
    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        entries = manifest.entries
        self.by_path: dict[bytes, Inode] = {}
        self.children: dict[int, list[bytes]] = {}
        by_index: list[Inode] = []
        path_index = {e.path: i for i, e in enumerate(entries)}
        nlinks = link_counts(entries)
        for i, e in enumerate(entries):
            if e.type == EntryType.HARDLINK:
                inode = by_index[path_index[e.link]]
            else:
                inode = Inode(i + 1, e, nlinks[i])
            by_index.append(inode)
            self.by_path[e.path] = inode
            if e.type == EntryType.DIR:
                self.children[inode.ino] = []
            if e.path:
                parent = e.path.rpartition(b"/")[0]
                self.children[self.by_path[parent].ino].append(e.path.rpartition(b"/")[2])
        self.total_size = sum(e.size for e in entries if e.type == EntryType.REG)

    def lookup(self, path: bytes) -> Inode | None:
        return self.by_path.get(path)

    @property
    def entry_count(self) -> int:
        return len(self.manifest.entries)

    def listdir(self, inode: Inode) -> list[tuple[bytes, Inode]]:
        prefix = inode.entry.path + b"/" if inode.entry.path else b""
        return [(name, self.by_path[prefix + name]) for name in self.children[inode.ino]]

    @staticmethod
    def stat(inode: Inode) -> dict:
        e = inode.entry
        size = e.size
        return {
            "st_ino": inode.ino, "st_mode": _FMT[e.type] | e.mode, "st_nlink": inode.nlink,
            "st_uid": e.uid, "st_gid": e.gid, "st_size": size,
            "st_blocks": (size + 511) // 512, "st_blksize": 131072,
            # FUSE carries rdev as 32 bits in the kernel's "new" encoding, which glibc's makedev
            # agrees with in its low 32 bits.
            "st_rdev": os.makedev(*e.rdev) & 0xFFFFFFFF,
            "st_mtime": e.mtime_ns, "st_ctime": e.mtime_ns, "st_atime": e.mtime_ns,
        }

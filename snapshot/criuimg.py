"""Reading CRIU's images: which memory of a dumped task lies where in its pages file (lazy
restore plans its fetches from it), and which tasks of the tree were stopped when it was dumped.
Pure, no I/O: bytes in, values out.

A CRIU image file is two little-endian u32 magics (IMG_COMMON_MAGIC, then the image's own) and a
sequence of protobuf messages, each preceded by its length as a u32. A pagemap holds one
pagemap_head {pages_id} and then pagemap_entry {vaddr, nr_pages, in_parent, flags} messages in
address order; the pages of every entry flagged PE_PRESENT lie back to back in
pages-<pages_id>.img, in entry order. Entries flagged PE_LAZY belong to private anonymous memory
that `criu restore --lazy-pages` leaves to a userfaultfd handler (criu/include/pagemap.h,
images/pagemap.proto in CRIU's source).

pstree.img holds one pstree_entry {pid = 1, ...} per process; core-<pid>.img one core_entry whose
tc (3), a task_core_entry, has task_state (1): 3 for a task stopped by a signal
(images/core.proto, compel/include/uapi/task-state.h).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from lazyfs.errors import LazyfsError

IMG_COMMON_MAGIC = 0x54564319
PAGEMAP_MAGIC = 0x56084025
PSTREE_MAGIC = 0x50273030
CORE_MAGIC = 0x55053847
TASK_STOPPED = 3
PAGE = 4096
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
MAX_ENTRIES = 1 << 22


class CriuImageError(LazyfsError):
    """A CRIU image file that cannot be read as what its name says it is."""


@dataclass(frozen=True)
class Extent:
    vaddr: int  # first byte of the memory
    pages: int
    offset: int  # where its bytes start in the pages file
    lazy: bool

    @property
    def end(self) -> int:
        return self.vaddr + self.pages * PAGE


@dataclass(frozen=True)
class PageMap:
    pages_id: int
    extents: tuple[Extent, ...]  # present entries only, in file order

    @property
    def pages_file(self) -> str:
        return f"pages-{self.pages_id}.img"

    def eager(self) -> list[tuple[int, int]]:
        """(offset, length) ranges of the pages file that `criu restore` itself reads."""
        return [(e.offset, e.pages * PAGE) for e in self.extents if not e.lazy]


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise CriuImageError("truncated or overlong varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _walk(msg: bytes):
    """(field number, value) of each field of a protobuf message: an int for varints and fixed
    widths, bytes for length-delimited fields (embedded messages, strings, packed lists)."""
    pos = 0
    while pos < len(msg):
        key, pos = _varint(msg, pos)
        kind = key & 7
        if kind == 0:
            value, pos = _varint(msg, pos)
        elif kind in (1, 5):
            width = 8 if kind == 1 else 4
            if pos + width > len(msg):
                raise CriuImageError("truncated fixed-width field")
            value, pos = int.from_bytes(msg[pos:pos + width], "little"), pos + width
        elif kind == 2:
            n, pos = _varint(msg, pos)
            if pos + n > len(msg):
                raise CriuImageError("truncated length-delimited field")
            value, pos = msg[pos:pos + n], pos + n
        else:
            raise CriuImageError(f"unexpected protobuf wire type {kind}")
        yield key >> 3, value


def _fields(msg: bytes) -> dict[int, int]:
    """The varint fields of a protobuf message (all pagemap fields are varints)."""
    out, pos = {}, 0
    while pos < len(msg):
        key, pos = _varint(msg, pos)
        if key & 7 != 0:
            raise CriuImageError(f"unexpected protobuf wire type {key & 7} in a pagemap")
        out[key >> 3], pos = _varint(msg, pos)
    return out


def _messages(data: bytes, magic: int):
    if len(data) < 8:
        raise CriuImageError("image too short for its magic")
    common, own = struct.unpack_from("<II", data)
    if common != IMG_COMMON_MAGIC or own != magic:
        raise CriuImageError(f"bad image magic {common:#x}/{own:#x}")
    pos = 8
    while pos < len(data):
        if pos + 4 > len(data):
            raise CriuImageError("truncated message length")
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + n > len(data):
            raise CriuImageError("truncated message")
        yield data[pos:pos + n]
        pos += n


def parse_pagemap(data: bytes) -> PageMap:
    msgs = _messages(data, PAGEMAP_MAGIC)
    head = _fields(next(msgs, b"\xff"))  # a missing head fails as a bad message
    if 1 not in head:
        raise CriuImageError("pagemap without a head")
    extents, offset, last_end = [], 0, 0
    for msg in msgs:
        f = _fields(msg)
        if 1 not in f or 2 not in f:
            raise CriuImageError("pagemap entry without vaddr or nr_pages")
        vaddr, pages, flags = f[1], f[2], f.get(4, PE_PRESENT)
        if f.get(3):  # in_parent (old images): pages in a parent dump, which we never make
            flags |= PE_PARENT
        if vaddr % PAGE or vaddr < last_end or not 0 < pages < 1 << 40:
            raise CriuImageError(f"pagemap entry at {vaddr:#x} ({pages} pages) out of order")
        last_end = vaddr + pages * PAGE
        if flags & PE_PARENT:
            raise CriuImageError("pagemap refers to a parent dump (incremental dumps are not used)")
        if flags & PE_PRESENT:
            extents.append(Extent(vaddr, pages, offset, bool(flags & PE_LAZY)))
            offset += pages * PAGE
        if len(extents) > MAX_ENTRIES:
            raise CriuImageError("pagemap has too many entries")
    return PageMap(head[1], tuple(extents))


def pstree_pids(data: bytes) -> list[int]:
    """The pid (in the tree's own PID namespace) of every process in a pstree image."""
    pids = []
    for msg in _messages(data, PSTREE_MAGIC):
        pid = next((v for f, v in _walk(msg) if f == 1 and isinstance(v, int)), None)
        if pid is None:
            raise CriuImageError("pstree entry without a pid")
        pids.append(pid)
    return pids


def task_state(data: bytes) -> int | None:
    """The task_state a core image records for its task (None: no task core, as a thread's)."""
    for msg in _messages(data, CORE_MAGIC):
        for field, tc in _walk(msg):
            if field == 3 and isinstance(tc, bytes):
                return next((v for f, v in _walk(tc) if f == 1 and isinstance(v, int)), None)
    return None

"""EROFS metadata images of a manifest (docs/format.md §12): pure code, no I/O.

The image holds the whole tree (names, types, modes, owners, mtimes, link targets, device numbers,
xattrs, hardlinks) and no file data. Each non-empty regular file is a chunk-based inode whose one
chunk is a hole, carrying overlayfs's ``trusted.overlay.metacopy`` and ``trusted.overlay.redirect``
xattrs that point at its data object (lazyfs.format.dataobj) in a data-only lower layer. So the
kernel answers every lookup, stat, readdir, readlink and getxattr itself, and opens a file's bytes
from wherever the object is: the node cache on local disk, or the lazyfs FUSE mount of the rest.
A missing object fails the open (ENOENT); the holes are never served, because overlayfs never
reads a metacopy inode's own data.

Layout: block 0 holds the superblock at byte 1024; inodes (64-byte extended form, 32-byte aligned,
each kept within one 4 KiB block when it fits) follow from byte 1152 (nid 36, so the root's nid fits
the superblock's 16 bits); directory and symlink data that fit beside their inode are inline,
larger directories take whole blocks after the inodes.
"""
from __future__ import annotations

import stat as st
import struct
from typing import NamedTuple

from lazyfs.errors import KernelLayoutUnsupported
from lazyfs.format import dataobj
from lazyfs.format.manifest import Entry, EntryType, Manifest, link_counts, sort_key

BLOCK_BITS = 12
BLOCK = 1 << BLOCK_BITS
SUPER_OFFSET = 1024
MAGIC = 0xE0F5E1E2
INCOMPAT_CHUNKED_FILE = 0x4
FLAT_PLAIN, FLAT_INLINE, CHUNK_BASED = 0, 2, 4
NULL_ADDR = 0xFFFFFFFF
FIRST_INODE = SUPER_OFFSET + 128
VOLUME_NAME = b"lazyfs"
VERSION = 1  # of this layout: part of the image's file name, so a node never reuses an older one

_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23s")
_INODE = struct.Struct("<HHHHQIIIIqII16s")  # erofs_inode_extended
_DIRENT = struct.Struct("<QHBB")
_XATTR_HEAD = struct.Struct("<IB7s")
_XATTR = struct.Struct("<BBH")
_U32 = struct.Struct("<I")
assert _SUPER.size == 128 and _INODE.size == 64 and _DIRENT.size == 12

# xattr name prefixes EROFS can index; a name outside them cannot be stored.
_PREFIXES = ((b"user.", 1), (b"trusted.", 4), (b"security.", 6))
_ACLS = {b"system.posix_acl_access": 2, b"system.posix_acl_default": 3}
_FTYPE = {EntryType.REG: 1, EntryType.DIR: 2, EntryType.CHR: 3, EntryType.BLK: 4,
          EntryType.FIFO: 5, EntryType.SOCK: 6, EntryType.SYMLINK: 7}
_IFMT = {EntryType.REG: st.S_IFREG, EntryType.DIR: st.S_IFDIR, EntryType.SYMLINK: st.S_IFLNK,
         EntryType.CHR: st.S_IFCHR, EntryType.BLK: st.S_IFBLK, EntryType.FIFO: st.S_IFIFO,
         EntryType.SOCK: st.S_IFSOCK}
# overlayfs reads trusted.overlay.* on a lower layer as its own; the image's own such xattrs are
# stored escaped (one more "overlay."), which overlayfs presents unescaped.
_OVERLAY = b"trusted.overlay."
METACOPY = (b"trusted.overlay.metacopy", b"")
REDIRECT = b"trusted.overlay.redirect"


class _Node(NamedTuple):
    entry: Entry
    nlink: int
    ino: int
    layout: int
    xattrs: bytes  # the inline xattr body (header and entries), b"" for none
    tail: bytes  # data stored right after the inode (inline data, or a chunk index)
    data: bytes  # data in whole blocks after the inode area (FLAT_PLAIN)
    i_u: int  # rdev, or the chunk format of a chunk-based file (the block address comes later)


def encode(manifest: Manifest, uuid: bytes = bytes(16)) -> bytes:
    """The EROFS image of ``manifest``, byte for byte the same for the same manifest and uuid.
    Raises KernelLayoutUnsupported for a tree overlayfs would misread (see _check)."""
    entries = sorted(manifest.entries, key=lambda e: sort_key(e.path))
    index = {e.path: i for i, e in enumerate(entries)}
    counts = link_counts(entries)
    children: dict[bytes, list[tuple[bytes, int]]] = {e.path: [] for e in entries
                                                       if e.type == EntryType.DIR}
    for i, e in enumerate(entries):
        if e.path:
            head, _, name = e.path.rpartition(b"/")
            children[head].append((name, index[e.link] if e.type == EntryType.HARDLINK else i))
    holders = [i for i, e in enumerate(entries) if e.type != EntryType.HARDLINK]
    # Pass 1: every inode's size, hence its position and nid; directory contents depend only on
    # their names' lengths here, so nids can be assigned before any dirent is written.
    nodes: dict[int, _Node] = {}
    nids: dict[int, int] = {}
    pos = FIRST_INODE
    for ino, i in enumerate(holders, start=1):
        e = entries[i]
        node = _node(e, counts[i], ino, children.get(e.path))
        size = _INODE.size + len(node.xattrs) + len(node.tail)
        if pos % BLOCK + size > BLOCK and size <= BLOCK:
            pos += BLOCK - pos % BLOCK  # inline data must not cross a block boundary
        nodes[i], nids[i] = node, pos // 32
        pos = (pos + size + 31) // 32 * 32
    # Pass 2: directory blocks, then the inodes. At least one byte of the block after the last
    # inode stays in the inode area: fsck.erofs 1.5 reads an xattr header past every inode.
    next_block = pos // BLOCK + 1
    out = bytearray(next_block * BLOCK)
    extra = bytearray()
    for i, node in nodes.items():
        e = node.entry
        blkaddr = node.i_u  # the union: rdev, chunk format, or (set below) the first data block
        if e.type == EntryType.DIR:
            dirents = _dirents(e.path, i, children[e.path], entries, index, nids)
            if node.layout == FLAT_INLINE:
                node = node._replace(tail=dirents)
            else:
                node = node._replace(data=dirents)
        if node.data:
            blkaddr = next_block + len(extra) // BLOCK
            extra += node.data + bytes(-len(node.data) % BLOCK)
        if node.layout == CHUNK_BASED:
            size = e.size
        elif e.type in (EntryType.DIR, EntryType.SYMLINK):
            size = len(node.data or node.tail)
        else:
            size = 0
        fmt = 1 | (node.layout << 1)
        icount = (len(node.xattrs) - _XATTR_HEAD.size) // 4 + 1 if node.xattrs else 0
        sec, nsec = divmod(e.mtime_ns, 1_000_000_000)
        at = nids[i] * 32
        body = _INODE.pack(fmt, icount, _IFMT[e.type] | e.mode, 0, size, blkaddr, node.ino,
                           e.uid, e.gid, sec, nsec, node.nlink, bytes(16)) + node.xattrs + node.tail
        out[at:at + len(body)] = body
    out += extra
    blocks = len(out) // BLOCK
    sb = _SUPER.pack(MAGIC, 0, 0, BLOCK_BITS, 0, nids[0], len(holders), 0, 0, blocks, 0, 0,
                     uuid, VOLUME_NAME, INCOMPAT_CHUNKED_FILE, 0, 0, 0, 0, 0, 0, 0, 0, bytes(23))
    out[SUPER_OFFSET:SUPER_OFFSET + len(sb)] = sb
    return bytes(out)


def _node(e: Entry, nlink: int, ino: int, kids: list | None) -> _Node:
    _check(e)
    xattrs = [(_OVERLAY + b"overlay." + k[len(_OVERLAY):] if k.startswith(_OVERLAY) else k, v)
              for k, v in e.xattrs]
    layout, tail, data, i_u, redirect = FLAT_PLAIN, b"", b"", 0, None
    if e.type == EntryType.REG and e.size:
        redirect = b"/" + dataobj.relpath(dataobj.object_id(e.chunks)).encode()
        bits = max(BLOCK_BITS, (e.size - 1).bit_length())
        chunks = -(-e.size >> bits)
        layout, i_u, tail = CHUNK_BASED, bits - BLOCK_BITS, _U32.pack(NULL_ADDR) * chunks
    elif e.type in (EntryType.CHR, EntryType.BLK):
        major, minor = e.rdev
        i_u = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)  # the kernel's new_encode_dev
    body = _xattr_body(e.path, xattrs, redirect)
    if e.type == EntryType.SYMLINK:
        tail = e.target
    elif e.type == EntryType.DIR:
        tail = bytes(_dir_size(kids))  # a placeholder of the right length
    if tail and e.type != EntryType.REG:
        if len(tail) < BLOCK and _INODE.size + len(body) + len(tail) <= BLOCK:
            layout = FLAT_INLINE
        else:
            layout, tail, data = FLAT_PLAIN, b"", tail
    return _Node(e, nlink, ino, layout, body, tail, data, i_u)


_MAX_CHUNK_BITS = 31  # chunk bits - 12, as i_u holds them


def _check(e: Entry) -> None:
    if e.type == EntryType.CHR and e.rdev == (0, 0):
        raise KernelLayoutUnsupported(f"{e.path!r} is a character device 0:0, which overlayfs "
                                      "reads as a whiteout")
    if e.rdev[0] >= 1 << 12 or e.rdev[1] >= 1 << 20:
        raise KernelLayoutUnsupported(f"{e.path!r}: device number {e.rdev} beyond 12:20 bits")
    if e.type == EntryType.REG and e.size > 1 << (BLOCK_BITS + _MAX_CHUNK_BITS):
        # One chunk per file, its size in the low 5 bits of i_u (EROFS_CHUNK_FORMAT_BLKBITS_MASK):
        # past 8 TiB the next bit would read as the chunk-indexes flag.
        raise KernelLayoutUnsupported(f"{e.path!r}: {e.size} bytes, more than one EROFS chunk holds")


def _xattr_item(key: bytes, value: bytes) -> bytes | None:
    """One inline xattr entry, padded to 4 bytes; None if EROFS has no encoding for it."""
    index, name = _ACLS.get(key), b""
    if index is None:
        index, name = next(((i, key[len(p):]) for p, i in _PREFIXES if key.startswith(p)),
                           (None, b""))
    if index is None or len(name) > 255 or len(value) > 0xFFFF:
        return None
    item = _XATTR.pack(len(name), index, len(value)) + name + value
    return item + bytes(-len(item) % 4)


_HEAD_BYTES = _XATTR_HEAD.pack(0, 0, bytes(7))
_METACOPY_ITEM = _xattr_item(*METACOPY)
# Every redirect value has the same length ("/" + 2 + "/" + 64): one header for all of them.
_REDIRECT_HEAD = _xattr_item(REDIRECT, bytes(68))[:-68]


def _xattr_body(path: bytes, xattrs, redirect: bytes | None) -> bytes:
    """The inline xattr body: the entry's own xattrs, then (regular files) the overlay pair."""
    if not xattrs and redirect is None:
        return b""
    out = bytearray(_HEAD_BYTES)
    for key, value in xattrs:
        item = _xattr_item(key, value)
        if item is None:
            raise KernelLayoutUnsupported(f"{path!r}: xattr {key!r} has no EROFS encoding")
        out += item
    if redirect is not None:
        out += _METACOPY_ITEM + _REDIRECT_HEAD + redirect
    if (len(out) - _XATTR_HEAD.size) // 4 + 1 > 0xFFFF:
        raise KernelLayoutUnsupported(f"{path!r}: xattrs too large for an EROFS inode")
    return bytes(out)


def _dir_names(kids: list[tuple[bytes, int]]) -> list[bytes]:
    return sorted([b".", b".."] + [name for name, _ in kids])


def _dir_blocks(names: list[bytes]) -> list[list[bytes]]:
    """Names in order, cut into blocks of dirents + names (each block read on its own)."""
    blocks, cur, used = [], [], 0
    for name in names:
        need = _DIRENT.size + len(name)
        if cur and used + need > BLOCK:
            blocks.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += need
    blocks.append(cur)
    return blocks


def _dir_size(kids) -> int:
    blocks = _dir_blocks(_dir_names(kids))
    last = sum(_DIRENT.size + len(n) for n in blocks[-1])
    return (len(blocks) - 1) * BLOCK + last


def _dirents(path: bytes, me: int, kids, entries, index, nids) -> bytes:
    by_name = {name: i for name, i in kids}
    by_name[b"."] = me
    by_name[b".."] = index[path.rpartition(b"/")[0]] if path else me
    out = bytearray()
    blocks = _dir_blocks(_dir_names(kids))
    for n, names in enumerate(blocks):
        heads, tails = bytearray(), bytearray()
        nameoff = _DIRENT.size * len(names)
        for name in names:
            i = by_name[name]
            heads += _DIRENT.pack(nids[i], nameoff + len(tails), _FTYPE[entries[i].type], 0)
            tails += name
        block = heads + tails
        out += block if n == len(blocks) - 1 else block + bytes(BLOCK - len(block))
    return bytes(out)

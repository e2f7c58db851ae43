"""The image manifest: every entry of the flattened file tree, encoded as in docs/format.md.

Encoding is canonical (one tree has exactly one encoding), so the manifest digest names the tree.
The decoder accepts only canonical input and raises ManifestFormatError for anything else; it never
lets another exception escape, whatever bytes it is given.
"""
from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field

from lazyfs.errors import ManifestFormatError
from lazyfs.format.block import MAX_BLOCK_SIZE

MAGIC = b"LZFSMANI"
VERSION = 1
MAX_NAME = 255
MAX_SYMLINK = 4095
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536
MAX_XATTRS = 1024
MAX_CONFIG = 1 << 20
MAX_ENTRIES = 10_000_000

_HEADER = struct.Struct("<8sHHII")  # magic, version, flags, chunk_size, entry_count
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<IH")  # parent, name_len
_META = struct.Struct("<IIIqIH")  # mode, uid, gid, mtime_sec, mtime_nsec, xattr_count
_REG = struct.Struct("<QI")  # size, chunk_count
_CHUNK = struct.Struct("<32sI")  # raw sha256, length
_DEV = struct.Struct("<II")


class EntryType(enum.IntEnum):
    REG = 1
    DIR = 2
    SYMLINK = 3
    HARDLINK = 4
    CHR = 5
    BLK = 6
    FIFO = 7
    SOCK = 8


@dataclass(frozen=True, slots=True)
class Chunk:
    digest: str  # "sha256:<hex>" of the uncompressed bytes
    size: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in the tree. ``path`` is relative, "/"-separated bytes; the root is ``b""``.

    For HARDLINK entries only ``link`` (the path of the entry holding the inode) is meaningful.
    """

    path: bytes
    type: EntryType
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    chunks: tuple[Chunk, ...] = ()
    target: bytes = b""
    link: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def components(self) -> tuple[bytes, ...]:
        return tuple(self.path.split(b"/")) if self.path else ()


@dataclass(frozen=True)
class Manifest:
    entries: tuple[Entry, ...]
    config: dict = field(default_factory=dict)
    chunk_size: int = 0

    def __post_init__(self):
        if not isinstance(self.entries, tuple):
            object.__setattr__(self, "entries", tuple(self.entries))

    def __eq__(self, other):
        return (isinstance(other, Manifest) and self.entries == other.entries
                and self.config == other.config and self.chunk_size == other.chunk_size)


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sort_key(path: bytes) -> tuple[bytes, ...]:
    """Canonical order: depth-first, siblings by name bytes (a parent sorts before its children)."""
    return tuple(path.split(b"/")) if path else ()


# --- encoding ----------------------------------------------------------------------------------

def encode(manifest: Manifest) -> bytes:
    entries = sorted(manifest.entries, key=lambda e: sort_key(e.path))
    index: dict[bytes, int] = {}
    out = bytearray()
    out += _HEADER.pack(MAGIC, VERSION, 0, manifest.chunk_size, len(entries))
    config = canonical_json(manifest.config)
    if not isinstance(manifest.config, dict) or len(config) > MAX_CONFIG:
        raise ManifestFormatError("config must be a JSON object of at most 1 MiB")
    out += _U32.pack(len(config)) + config
    for i, e in enumerate(entries):
        if e.path in index:
            raise ManifestFormatError(f"duplicate path {e.path!r}")
        index[e.path] = i
        _encode_entry(out, e, i, index, entries)
    return bytes(out)


def _encode_entry(out: bytearray, e: Entry, i: int, index: dict[bytes, int], entries) -> None:
    if i == 0:
        if e.path != b"" or e.type != EntryType.DIR:
            raise ManifestFormatError("the first entry must be the root directory (path b'')")
        parent, name = 0, b""
    else:
        head, _, name = e.path.rpartition(b"/")
        parent = index.get(head)
        if parent is None or entries[parent].type != EntryType.DIR:
            raise ManifestFormatError(f"{e.path!r}: parent is not a directory in the manifest")
        _check_name(name)
    out += _HEAD.pack(parent, len(name)) + name + _U8.pack(int(e.type))
    if e.type == EntryType.HARDLINK:
        target = index.get(e.link)
        if target is None or entries[target].type in (EntryType.DIR, EntryType.HARDLINK):
            raise ManifestFormatError(f"{e.path!r}: hardlink must follow its non-directory target")
        out += _U32.pack(target)
        return
    if not 0 <= e.mode <= 0o7777:
        raise ManifestFormatError(f"{e.path!r}: mode {e.mode:o} has bits beyond 07777")
    sec, nsec = divmod(e.mtime_ns, 1_000_000_000)
    xattrs = sorted(e.xattrs)
    out += _META.pack(e.mode, e.uid, e.gid, sec, nsec, len(xattrs))
    _encode_xattrs(out, e.path, xattrs)
    if e.type == EntryType.REG:
        if sum(c.size for c in e.chunks) != e.size:
            raise ManifestFormatError(f"{e.path!r}: chunk sizes do not add up to the file size")
        out += _REG.pack(e.size, len(e.chunks))
        for c in e.chunks:
            if not 0 < c.size <= MAX_BLOCK_SIZE:
                raise ManifestFormatError(f"{e.path!r}: chunk size {c.size} out of range")
            out += _CHUNK.pack(bytes.fromhex(c.digest[7:]), c.size)
    elif e.type == EntryType.SYMLINK:
        if not 0 < len(e.target) <= MAX_SYMLINK or b"\0" in e.target or e.size != len(e.target):
            raise ManifestFormatError(f"{e.path!r}: bad symlink target")
        out += _U16.pack(len(e.target)) + e.target
    elif e.type in (EntryType.CHR, EntryType.BLK):
        out += _DEV.pack(*e.rdev)
    if e.type not in (EntryType.REG, EntryType.SYMLINK) and e.size != 0:
        raise ManifestFormatError(f"{e.path!r}: only files and symlinks have a size")


def _encode_xattrs(out: bytearray, path: bytes, xattrs) -> None:
    if len(xattrs) > MAX_XATTRS:
        raise ManifestFormatError(f"{path!r}: more than {MAX_XATTRS} xattrs")
    prev = None
    for key, value in xattrs:
        if not 0 < len(key) <= MAX_XATTR_NAME or b"\0" in key or key == prev:
            raise ManifestFormatError(f"{path!r}: bad or duplicate xattr name {key!r}")
        if len(value) > MAX_XATTR_VALUE:
            raise ManifestFormatError(f"{path!r}: xattr {key!r} value too large")
        prev = key
        out += _U8.pack(len(key)) + key + _U32.pack(len(value)) + value


def _check_name(name: bytes) -> None:
    if not 0 < len(name) <= MAX_NAME or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise ManifestFormatError(f"invalid entry name {name!r}")


# --- decoding ----------------------------------------------------------------------------------

class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes):
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, st: struct.Struct) -> tuple:
        end = self.pos + st.size
        if end > len(self.buf):
            raise ManifestFormatError("manifest is truncated")
        values = st.unpack_from(self.buf, self.pos)
        self.pos = end
        return values

    def bytes(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise ManifestFormatError("manifest is truncated")
        data = bytes(self.buf[self.pos:end])
        self.pos = end
        return data


def decode(data: bytes) -> Manifest:
    try:
        return _decode(data)
    except ManifestFormatError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as exc:
        raise ManifestFormatError(f"malformed manifest ({type(exc).__name__}: {exc})") from None


def _decode(data: bytes) -> Manifest:
    r = _Reader(data)
    magic, version, flags, chunk_size, count = r.take(_HEADER)
    if magic != MAGIC:
        raise ManifestFormatError("not a lazyfs manifest (bad magic)")
    if version != VERSION:
        raise ManifestFormatError(f"unsupported manifest version {version} (this lazyfs reads {VERSION})")
    if flags != 0:
        raise ManifestFormatError(f"unknown manifest flags {flags:#x}")
    if not 0 < count <= MAX_ENTRIES:
        raise ManifestFormatError(f"entry count {count} out of range")
    (clen,) = r.take(_U32)
    if clen > MAX_CONFIG:
        raise ManifestFormatError("config section too large")
    raw_config = r.bytes(clen)
    config = json.loads(raw_config.decode("utf-8"))
    if not isinstance(config, dict) or canonical_json(config) != raw_config:
        raise ManifestFormatError("config section is not a canonical JSON object")
    entries: list[Entry] = []
    keys: list[tuple[bytes, ...]] = []
    for i in range(count):
        entry, key = _decode_entry(r, i, entries, keys)
        if i and key <= keys[-1]:
            raise ManifestFormatError(f"entry {entry.path!r} out of canonical order or duplicated")
        entries.append(entry)
        keys.append(key)
    if r.pos != len(r.buf):
        raise ManifestFormatError(f"{len(r.buf) - r.pos} unexpected bytes after the last entry")
    return Manifest(tuple(entries), config, chunk_size)


def _decode_entry(r: _Reader, i: int, entries: list[Entry], keys: list) -> tuple[Entry, tuple]:
    parent, name_len = r.take(_HEAD)
    name = r.bytes(name_len)
    (raw_type,) = r.take(_U8)
    try:
        etype = EntryType(raw_type)
    except ValueError:
        raise ManifestFormatError(f"entry {i}: unknown type {raw_type}") from None
    if i == 0:
        if parent != 0 or name or etype != EntryType.DIR:
            raise ManifestFormatError("entry 0 must be the root directory")
        path, key = b"", ()
    else:
        if parent >= i or entries[parent].type != EntryType.DIR:
            raise ManifestFormatError(f"entry {i}: parent {parent} is not an earlier directory")
        _check_name(name)
        key = keys[parent] + (name,)
        path = b"/".join(key)
    if etype == EntryType.HARDLINK:
        (target,) = r.take(_U32)
        if target >= i or entries[target].type in (EntryType.DIR, EntryType.HARDLINK):
            raise ManifestFormatError(f"entry {path!r}: hardlink target {target} invalid")
        return Entry(path, etype, link=entries[target].path), key
    mode, uid, gid, sec, nsec, nxattr = r.take(_META)
    if mode > 0o7777 or nsec >= 1_000_000_000 or nxattr > MAX_XATTRS:
        raise ManifestFormatError(f"entry {path!r}: mode, mtime or xattr count out of range")
    xattrs = []
    for _ in range(nxattr):
        (klen,) = r.take(_U8)
        xkey = r.bytes(klen)
        (vlen,) = r.take(_U32)
        if vlen > MAX_XATTR_VALUE:
            raise ManifestFormatError(f"entry {path!r}: xattr value too large")
        value = r.bytes(vlen)
        if not xkey or b"\0" in xkey or (xattrs and xkey <= xattrs[-1][0]):
            raise ManifestFormatError(f"entry {path!r}: xattr names empty or not sorted")
        xattrs.append((xkey, value))
    common = dict(mode=mode, uid=uid, gid=gid, mtime_ns=sec * 1_000_000_000 + nsec, xattrs=tuple(xattrs))
    if etype == EntryType.REG:
        size, nchunks = r.take(_REG)
        if nchunks > (len(r.buf) - r.pos) // _CHUNK.size:
            raise ManifestFormatError("manifest is truncated")
        chunks = []
        total = 0
        for _ in range(nchunks):
            raw, csize = r.take(_CHUNK)
            if not 0 < csize <= MAX_BLOCK_SIZE:
                raise ManifestFormatError(f"entry {path!r}: chunk size {csize} out of range")
            total += csize
            chunks.append(Chunk("sha256:" + raw.hex(), csize))
        if total != size:
            raise ManifestFormatError(f"entry {path!r}: chunks add up to {total}, size is {size}")
        return Entry(path, etype, size=size, chunks=tuple(chunks), **common), key
    if etype == EntryType.SYMLINK:
        (tlen,) = r.take(_U16)
        target = r.bytes(tlen)
        if not 0 < tlen <= MAX_SYMLINK or b"\0" in target:
            raise ManifestFormatError(f"entry {path!r}: bad symlink target")
        return Entry(path, etype, size=tlen, target=target, **common), key
    if etype in (EntryType.CHR, EntryType.BLK):
        return Entry(path, etype, rdev=r.take(_DEV), **common), key
    return Entry(path, etype, **common), key

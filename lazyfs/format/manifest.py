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
from typing import NamedTuple

from lazyfs.errors import ManifestFormatError
from lazyfs.format import digest as digests
from lazyfs.format.block import MAX_BLOCK_SIZE
from lazyfs.format.guard import total

MAGIC = b"LZFSMANI"
VERSION = 1
MAX_NAME = 255
MAX_DEPTH = 256  # components of a path: deeper than kernels address (and each path is kept whole)
MAX_PATH = 4096  # bytes of a path (PATH_MAX)
# The paths of all entries together, in bytes: at most PATHS_PER_BYTE for each byte of the
# manifest, plus PATHS_ALLOWANCE (one chain of directories as deep and long as paths go). A
# decoded entry keeps its whole path while it is encoded as one name under its parent, so without
# this a small manifest of deep entries decodes to hundreds of times its size; real trees hold
# under one byte of path for each byte of manifest.
PATHS_PER_BYTE = 16
PATHS_ALLOWANCE = MAX_DEPTH * MAX_PATH
MAX_SYMLINK = 4095
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536
MAX_XATTRS = 1024
MAX_CONFIG = 1 << 20
MAX_ENTRIES = 4_000_000  # also the build's default --max-entries, which cannot exceed it
MAX_MANIFEST = 256 * 1024 * 1024  # uncompressed bytes of any manifest-kind record, stored as a frame
MAX_MANIFEST_FRAME = MAX_MANIFEST + MAX_MANIFEST // 128 + 4096  # its frame at most (zstd's bound)
DEFAULT_CHUNK_SIZE = 512 * 1024  # files are cut into blocks of this size; docs/format.md "Chunking, and why"

_HEADER = struct.Struct("<8sHHII")  # magic, version, flags, chunk_size, entry_count
FLAG_META = 0x1  # the header names a mount metadata record (lazyfs.format.metaimage) after the config
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<IH")  # parent, name_len
_META = struct.Struct("<IIIqIH")  # mode, uid, gid, mtime_sec, mtime_nsec, xattr_count
_U32_MAX, _SEC_MIN, _SEC_MAX = (1 << 32) - 1, -(1 << 63), (1 << 63) - 1  # what _META and _DEV hold
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


class Chunk(NamedTuple):
    digest: str  # "sha256:<hex>" of the uncompressed bytes
    size: int


# NamedTuples rather than frozen dataclasses: a manifest of a large image has tens of thousands of
# entries and decoding them is on the mount's start-up path, where tuple construction is ~3x faster.
class Entry(NamedTuple):
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
    # The digest of the image's mount metadata record (lazyfs.format.metaimage), when the build
    # made one: a node mounts that EROFS image instead of generating it from the entries.
    meta: str | None = None

    def __post_init__(self):
        if not isinstance(self.entries, tuple):
            object.__setattr__(self, "entries", tuple(self.entries))

    def __eq__(self, other):
        return (isinstance(other, Manifest) and self.entries == other.entries
                and self.config == other.config and self.chunk_size == other.chunk_size
                and self.meta == other.meta)


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sort_key(path: bytes) -> tuple[bytes, ...]:
    """Canonical order: depth-first, siblings by name bytes (a parent sorts before its children)."""
    return tuple(path.split(b"/")) if path else ()


def hardlinks(entries) -> dict[bytes, int]:
    """How many HARDLINK entries name each path: a file's st_nlink is one more."""
    out: dict[bytes, int] = {}
    for e in entries:
        if e.type == EntryType.HARDLINK:
            out[e.link] = out.get(e.link, 0) + 1
    return out


def link_counts(entries) -> list[int]:
    """st_nlink of each entry's inode, by index: names of a file (itself and its HARDLINKs), or 2
    plus the subdirectories of a directory. A HARDLINK's own slot is unused. ``entries`` in
    canonical order, so a parent comes before its children."""
    path_index = {e.path: i for i, e in enumerate(entries)}
    counts = [1] * len(entries)
    for path, n in hardlinks(entries).items():
        counts[path_index[path]] += n
    for i, e in enumerate(entries):
        if e.type == EntryType.DIR:
            counts[i] += 1
            if e.path:
                counts[path_index[e.path.rpartition(b"/")[0]]] += 1  # the subdirectory's ".."
    return counts


# --- encoding ----------------------------------------------------------------------------------

def encode(manifest: Manifest) -> bytes:
    entries = sorted(manifest.entries, key=lambda e: sort_key(e.path))
    # What the header's fields hold and the decoder takes; struct would pad a short digest or
    # raise its own error for a number out of range.
    if not 0 < len(entries) <= MAX_ENTRIES:
        raise ManifestFormatError(f"entry count {len(entries)} out of range (1 to {MAX_ENTRIES})")
    if not 0 <= manifest.chunk_size <= _U32_MAX:
        raise ManifestFormatError(f"chunk size {manifest.chunk_size} out of range (0 to {_U32_MAX})")
    index: dict[bytes, int] = {}
    out = bytearray()
    out += _HEADER.pack(MAGIC, VERSION, FLAG_META if manifest.meta else 0, manifest.chunk_size, len(entries))
    config = canonical_json(manifest.config)
    if not isinstance(manifest.config, dict) or len(config) > MAX_CONFIG:
        raise ManifestFormatError("config must be a JSON object of at most 1 MiB")
    out += _U32.pack(len(config)) + config
    if manifest.meta:
        out += digests.to_raw(manifest.meta)
    paths = 0
    for i, e in enumerate(entries):
        if e.path in index:
            raise ManifestFormatError(f"duplicate path {e.path!r}")
        index[e.path] = i
        _encode_entry(out, e, i, index, entries)
        paths += len(e.path)
    _check_paths(paths, len(out))
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
        _check_path(e.path, e.path.count(b"/") + 1)
    out += _HEAD.pack(parent, len(name)) + name + _U8.pack(int(e.type))
    if e.type == EntryType.HARDLINK:
        target = index.get(e.link)
        if target is None or entries[target].type in (EntryType.DIR, EntryType.HARDLINK):
            raise ManifestFormatError(f"{e.path!r}: hardlink must follow its non-directory target")
        out += _U32.pack(target)
        return
    if not 0 <= e.mode <= 0o7777:
        raise ManifestFormatError(f"{e.path!r}: mode {e.mode:o} has bits beyond 07777")
    xattrs = sorted(e.xattrs)
    check_fields(e.path, e.uid, e.gid, e.mtime_ns, xattrs, e.rdev if e.type in (EntryType.CHR, EntryType.BLK) else ())
    sec, nsec = divmod(e.mtime_ns, 1_000_000_000)
    out += _META.pack(e.mode, e.uid, e.gid, sec, nsec, len(xattrs))
    for key, value in xattrs:
        out += _U8.pack(len(key)) + key + _U32.pack(len(value)) + value
    if e.type == EntryType.REG:
        if sum(c.size for c in e.chunks) != e.size:
            raise ManifestFormatError(f"{e.path!r}: chunk sizes do not add up to the file size")
        out += _REG.pack(e.size, len(e.chunks))
        for c in e.chunks:
            if not 0 < c.size <= MAX_BLOCK_SIZE:
                raise ManifestFormatError(f"{e.path!r}: chunk size {c.size} out of range")
            # Checked whole: fromhex takes uppercase and any length, and the raw field is
            # zero-padded, so another spelling would be stored as another digest.
            if not digests.is_valid(c.digest):
                raise ManifestFormatError(f"{e.path!r}: chunk digest {c.digest!r} is not a sha256 digest")
            out += _CHUNK.pack(bytes.fromhex(c.digest[7:]), c.size)
    elif e.type == EntryType.SYMLINK:
        if not 0 < len(e.target) <= MAX_SYMLINK or b"\0" in e.target or e.size != len(e.target):
            raise ManifestFormatError(f"{e.path!r}: bad symlink target")
        out += _U16.pack(len(e.target)) + e.target
    elif e.type in (EntryType.CHR, EntryType.BLK):
        out += _DEV.pack(*e.rdev)
    if e.type not in (EntryType.REG, EntryType.SYMLINK) and e.size != 0:
        raise ManifestFormatError(f"{e.path!r}: only files and symlinks have a size")


def _check_path(path: bytes, depth: int) -> None:
    """Writers and readers alike: a path no kernel can address is refused (and a reader, which
    keeps each entry's whole path, would spend memory growing with the square of a chain of
    directories on it)."""
    if depth > MAX_DEPTH or len(path) > MAX_PATH:
        raise ManifestFormatError(f"entry {path[:64]!r}...: deeper than {MAX_DEPTH} levels or longer "
                                  f"than {MAX_PATH} bytes")


def paths_limit(manifest_len: int) -> int:
    """The most bytes the paths of a manifest of ``manifest_len`` bytes may add up to."""
    return PATHS_PER_BYTE * manifest_len + PATHS_ALLOWANCE


def _check_paths(paths: int, manifest_len: int) -> None:
    if paths > paths_limit(manifest_len):
        raise ManifestFormatError(f"the entries' paths add up to more than {paths_limit(manifest_len)} "
                                  f"bytes ({PATHS_PER_BYTE} for each of the manifest's {manifest_len} "
                                  f"bytes, plus {PATHS_ALLOWANCE})")


def check_fields(path: bytes, uid: int, gid: int, mtime_ns: int, xattrs, rdev=()) -> None:
    """An entry's numbers and xattrs (sorted) as the format holds them, else ManifestFormatError:
    the encoder checks, and the builder asks the same while a layer streams, before any of its
    blocks is stored (a tar's numbers and xattrs are free-form)."""
    for name, value in (("uid", uid), ("gid", gid), *zip(("devmajor", "devminor"), rdev)):
        if not 0 <= value <= _U32_MAX:
            raise ManifestFormatError(f"{path!r}: {name} {value} is out of range (0 to {_U32_MAX})")
    if not _SEC_MIN <= mtime_ns // 1_000_000_000 <= _SEC_MAX:
        raise ManifestFormatError(f"{path!r}: mtime {mtime_ns // 1_000_000_000} is out of range")
    if len(xattrs) > MAX_XATTRS:
        raise ManifestFormatError(f"{path!r}: more than {MAX_XATTRS} xattrs")
    prev = None
    for key, value in xattrs:
        if not 0 < len(key) <= MAX_XATTR_NAME or b"\0" in key or key == prev:
            raise ManifestFormatError(f"{path!r}: xattr {key[:40]!r}: an empty, too long, NUL-holding "
                                      "or repeated name")
        if len(value) > MAX_XATTR_VALUE:
            raise ManifestFormatError(f"{path!r}: xattr {key[:40]!r}: a value over {MAX_XATTR_VALUE} bytes")
        prev = key


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


@total("manifest", ManifestFormatError)
def decode(data: bytes) -> Manifest:
    return _decode(data)


@total("manifest", ManifestFormatError)
def decode_config(data: bytes) -> dict:
    """Only the image config, without decoding the entries (what `lazyfs run` needs up front)."""
    return _decode_head(_Reader(data))[2]


@total("manifest", ManifestFormatError)
def decode_meta(data: bytes) -> str | None:
    """Only the digest of the mount metadata record, if the manifest names one (what a cold
    mount needs first), without decoding the entries."""
    return _decode_head(_Reader(data))[3]


def _decode_head(r: _Reader) -> tuple[int, int, dict, str | None]:
    magic, version, flags, chunk_size, count = r.take(_HEADER)
    if magic != MAGIC:
        raise ManifestFormatError("not a lazyfs manifest (bad magic)")
    if version != VERSION:
        raise ManifestFormatError(f"unsupported manifest version {version} (this lazyfs reads {VERSION})")
    if flags & ~FLAG_META:
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
    meta = digests.from_raw(r.bytes(32)) if flags & FLAG_META else None
    return chunk_size, count, config, meta


_BY_CODE = {t.value: t for t in EntryType}
_DOTS = (b".", b"..")
_NS = 1_000_000_000


def _decode(data: bytes) -> Manifest:
    r = _Reader(data)
    chunk_size, count, config, meta_digest = _decode_head(r)
    # One flat loop with local names: this runs once per entry on every mount's start-up (a
    # kernel-path restore waits for it). Slices of the bytes object itself (one copy, where a
    # memoryview slice is two); tuples made with tuple.__new__ (a NamedTuple's own __new__ is
    # Python code parsing keywords), about a third faster on a 30,000-entry manifest.
    buf, pos = bytes(data), r.pos
    end = len(buf)
    head, meta, reg, chunk, u8, u16, u32 = (_HEAD.unpack_from, _META.unpack_from, _REG.unpack_from,
                                           _CHUNK.unpack_from, _U8.unpack_from, _U16.unpack_from,
                                           _U32.unpack_from)
    DIR, HARDLINK, REG, SYMLINK = EntryType.DIR, EntryType.HARDLINK, EntryType.REG, EntryType.SYMLINK
    new, no_rdev = tuple.__new__, (0, 0)
    entries: list[Entry] = []
    # Canonical order compares paths component by component; names hold neither "/" nor NUL, so
    # that is the byte order of the path spelled with NUL for "/" (a parent's shorter path sorts
    # first, as NUL sorts below every name byte). Only the last entry's spelling is kept: a tuple
    # of components kept for every entry cost more than its path (8 bytes a component).
    last = b""
    depths: list[int] = []
    # Counted as each path is made, so a manifest over the limit is refused before its paths
    # take the memory the limit is there to bound.
    paths, paths_max = 0, paths_limit(end)
    types: list[EntryType] = []

    def take(n: int) -> bytes:
        nonlocal pos
        out = buf[pos:pos + n]
        if len(out) != n:
            raise ManifestFormatError("manifest is truncated")
        pos += n
        return out

    for i in range(count):
        parent, name_len = head(buf, pos)
        pos += 6
        name = buf[pos:pos + name_len]
        if len(name) != name_len:
            raise ManifestFormatError("manifest is truncated")
        pos += name_len
        etype = _BY_CODE.get(u8(buf, pos)[0])
        pos += 1
        if etype is None:
            raise ManifestFormatError(f"entry {i}: unknown type {buf[pos - 1]}")
        if i == 0:
            if parent != 0 or name or etype != DIR:
                raise ManifestFormatError("entry 0 must be the root directory")
            path, depth = b"", 0
        else:
            if parent >= i or types[parent] != DIR:
                raise ManifestFormatError(f"entry {i}: parent {parent} is not an earlier directory")
            if not 0 < name_len <= MAX_NAME or name in _DOTS or b"/" in name or b"\0" in name:
                _check_name(name)  # (raises, saying why)
            path = entries[parent].path + b"/" + name if parent else name
            order = path.replace(b"/", b"\0")
            if order <= last:
                raise ManifestFormatError(f"entry {path!r} out of canonical order or duplicated")
            last = order
            depth = depths[parent] + 1
            _check_path(path, depth)
            paths += len(path)
            if paths > paths_max:
                _check_paths(paths, end)  # (raises, saying why)
        if etype == HARDLINK:
            (target,) = u32(buf, pos)
            pos += 4
            if target >= i or types[target] in (DIR, HARDLINK):
                raise ManifestFormatError(f"entry {path!r}: hardlink target {target} invalid")
            entry = new(Entry, (path, etype, 0o644, 0, 0, 0, 0, (), b"", entries[target].path, no_rdev,
                                ()))
        else:
            mode, uid, gid, sec, nsec, nxattr = meta(buf, pos)
            pos += _META.size
            if mode > 0o7777 or nsec >= _NS or nxattr > MAX_XATTRS:
                raise ManifestFormatError(f"entry {path!r}: mode, mtime or xattr count out of range")
            xattrs: tuple | list = ()
            if nxattr:
                xattrs = []
                for _ in range(nxattr):
                    (klen,) = u8(buf, pos)
                    pos += 1
                    xkey = take(klen)
                    (vlen,) = u32(buf, pos)
                    pos += 4
                    if vlen > MAX_XATTR_VALUE:
                        raise ManifestFormatError(f"entry {path!r}: xattr value too large")
                    value = take(vlen)
                    if not xkey or b"\0" in xkey or (xattrs and xkey <= xattrs[-1][0]):
                        raise ManifestFormatError(f"entry {path!r}: xattr names empty or not sorted")
                    xattrs.append((xkey, value))
                xattrs = tuple(xattrs)
            mtime = sec * _NS + nsec
            size, chunks, target, rdev = 0, (), b"", no_rdev
            if etype == REG:
                size, nchunks = reg(buf, pos)
                pos += 12
                if nchunks > (end - pos) // 36:
                    raise ManifestFormatError("manifest is truncated")
                out = []
                total = 0
                for _ in range(nchunks):
                    raw, csize = chunk(buf, pos)
                    pos += 36
                    if not 0 < csize <= MAX_BLOCK_SIZE:
                        raise ManifestFormatError(f"entry {path!r}: chunk size {csize} out of range")
                    total += csize
                    out.append(new(Chunk, ("sha256:" + raw.hex(), csize)))
                if total != size:
                    raise ManifestFormatError(f"entry {path!r}: chunks add up to {total}, size is {size}")
                chunks = tuple(out)
            elif etype == SYMLINK:
                (size,) = u16(buf, pos)
                pos += 2
                target = take(size)
                if not 0 < size <= MAX_SYMLINK or b"\0" in target:
                    raise ManifestFormatError(f"entry {path!r}: bad symlink target")
            elif etype in (EntryType.CHR, EntryType.BLK):
                rdev = _DEV.unpack_from(buf, pos)
                pos += 8
            entry = new(Entry, (path, etype, mode, uid, gid, mtime, size, chunks, target, b"", rdev, xattrs))
        entries.append(entry)
        depths.append(depth)
        types.append(etype)
    if pos != end:
        raise ManifestFormatError(f"{end - pos} unexpected bytes after the last entry")
    return Manifest(tuple(entries), config, chunk_size, meta_digest)

"""Reading one layer: decompress (gzip, zstd or plain), verify its digests, yield LayerEntry records."""
from __future__ import annotations

import base64
import gzip
import hashlib
import os
import tarfile
import zlib
from typing import BinaryIO, Callable
from urllib.parse import unquote_to_bytes

import zstandard

from lazyfs.errors import (FormatError, ImageSourceError, LayerDigestMismatch, LazyfsError, LimitExceeded,
                           UnsafeEntry)
from lazyfs.format import manifest as mf
from lazyfs.format.manifest import EntryType

from imagebuilder.tree import LayerEntry

_TYPES = {
    tarfile.REGTYPE: EntryType.REG, tarfile.AREGTYPE: EntryType.REG, tarfile.CONTTYPE: EntryType.REG,
    tarfile.GNUTYPE_SPARSE: EntryType.REG, tarfile.DIRTYPE: EntryType.DIR,
    tarfile.SYMTYPE: EntryType.SYMLINK, tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.CHRTYPE: EntryType.CHR, tarfile.BLKTYPE: EntryType.BLK, tarfile.FIFOTYPE: EntryType.FIFO,
}
# Errors that mean "this archive is broken", from every decoder we stack.
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError,
                  UnicodeError, ValueError)


class HashingReader:
    """Passes reads through while hashing and counting them."""

    def __init__(self, raw: BinaryIO, on_read: Callable[[int], None] | None = None,
                 limit: int | None = None, what: str = ""):
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0
        self.holes = 0  # what counts against the limit beside the stream: sparse files' holes
        self.on_read = on_read
        self.limit = limit
        self.what = what

    def read(self, n: int = -1) -> bytes:
        if self.limit is not None and n < 0:
            n = self.limit + 1 - self.count - self.holes  # never inflate an unbounded amount at once
        data = self.raw.read(n)
        self.hash.update(data)
        self.count += len(data)
        if self.limit is not None and self.count + self.holes > self.limit:
            holes = f" (with {self.holes} bytes of sparse files' holes)" if self.holes else ""
            raise LimitExceeded(f"{self.what} inflates past the {self.limit} byte limit{holes} "
                                "(decompression bomb? raise it with --max-size)")
        if self.on_read and data:
            self.on_read(len(data))
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _Peekable:
    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.head = b""

    def peek(self, n: int) -> bytes:
        while len(self.head) < n:
            more = self.raw.read(n - len(self.head))
            if not more:
                break
            self.head += more
        return self.head[:n]

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.raw.read(n)
        if n < 0:
            data, self.head = self.head + self.raw.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]  # a short read; every caller loops
        return data


def decompressed(raw: BinaryIO) -> BinaryIO:
    """Pick the decoder by magic bytes: media types lie more often than magic does."""
    peek = _Peekable(raw)
    head = peek.peek(4)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=peek, mode="rb")
    if head == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(peek, read_across_frames=True)
    return peek


def _mtime_ns(info: tarfile.TarInfo) -> int:
    text = info.pax_headers.get("mtime")
    if text:
        sec, _, frac = text.partition(".")
        neg = sec.startswith("-")
        ns = int(sec) * 1_000_000_000 + (-1 if neg else 1) * int((frac + "000000000")[:9] or 0)
        return ns
    return int(info.mtime) * 1_000_000_000


def _xattrs(info: tarfile.TarInfo) -> tuple[tuple[bytes, bytes], ...]:
    out = {}
    for key, value in info.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[13:].encode("utf-8", "surrogateescape")] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            out[unquote_to_bytes(key[17:])] = base64.b64decode(value + "=" * (-len(value) % 4))
    return tuple(sorted(out.items()))


def read_layer(layer: str, raw: BinaryIO, digest: str | None, diff_id: str | None,
               on_entry: Callable[[LayerEntry, BinaryIO | None], None],
               on_read: Callable[[int], None] | None = None, max_bytes: int | None = None) -> int:
    """Stream one layer through ``on_entry`` (which must consume regular-file content), then check
    its compressed digest and uncompressed diff_id. Any archive damage becomes ImageSourceError.
    Returns the size it expands to (the stream and sparse files' holes); more than ``max_bytes``
    of it is refused while inflating."""
    outer = HashingReader(raw, on_read)
    try:
        inner = HashingReader(decompressed(outer), limit=max_bytes, what=f"layer {layer}")
        with tarfile.open(fileobj=inner, mode="r|", errors="surrogateescape") as tf:
            for info in tf:
                entry = to_entry(layer, info)
                if info.issparse() and entry.type == EntryType.REG:
                    # Its holes read as zeroes the stream never carries (its data, the stream
                    # counts): charged to the same budget.
                    inner.holes += max(0, info.size - sum(n for _, n in info.sparse))
                    if max_bytes is not None and inner.count + inner.holes > max_bytes:
                        raise LimitExceeded(f"layer {layer}: entry {info.name!r} is a sparse file "
                                            f"of {info.size} bytes, beyond the limit of "
                                            f"{max_bytes} (--max-size)")
                stream = tf.extractfile(info) if entry.type == EntryType.REG else None
                on_entry(entry, stream)
        inner.drain()
        outer.drain()
    except LazyfsError:
        raise
    except ARCHIVE_ERRORS as exc:
        # A blob damaged in storage or in transit usually breaks the decoder first; the digest says
        # what really happened, so finish hashing the (bounded) rest before blaming the archive.
        actual = _rest_hash(outer) if digest else None
        if actual is not None and actual != digest:
            raise LayerDigestMismatch(f"layer {layer}", digest, actual) from None
        raise ImageSourceError(f"layer {layer}: not a readable tar archive ({exc or type(exc).__name__})") from None
    except OSError as exc:
        raise ImageSourceError(f"layer {layer}: read failed ({exc})") from None
    if inner.count == 0:
        raise ImageSourceError(f"layer {layer}: empty")
    if digest and outer.digest() != digest:
        raise LayerDigestMismatch(f"layer {layer}", digest, outer.digest())
    if diff_id and inner.digest() != diff_id:
        raise LayerDigestMismatch(f"layer {layer} (uncompressed diff_id)", diff_id, inner.digest())
    return inner.count + inner.holes


def _rest_hash(outer: HashingReader) -> str | None:
    try:
        outer.drain()
    except (OSError, LazyfsError):
        return None  # unreadable: the archive error stands
    return outer.digest()


def to_entry(layer: str, info: tarfile.TarInfo) -> LayerEntry:
    kind = _TYPES.get(info.type)
    path = os.fsencode(info.name)
    if kind is None:
        raise UnsafeEntry(layer, info.name, f"unsupported tar entry type {info.type!r}")
    if info.size < 0:  # (a pax size or GNU.sparse.realsize can say so; it would pay back a budget)
        raise UnsafeEntry(layer, info.name, f"negative size {info.size}")
    common = dict(path=path, type=kind, mode=info.mode & 0o7777, uid=info.uid, gid=info.gid,
                  mtime_ns=_mtime_ns(info), xattrs=_xattrs(info))
    try:  # (what the manifest cannot hold: refused now, not after every block is stored)
        mf.check_fields(path, info.uid, info.gid, common["mtime_ns"], common["xattrs"],
                        (info.devmajor, info.devminor) if kind in (EntryType.CHR, EntryType.BLK) else ())
    except FormatError as exc:
        raise UnsafeEntry(layer, info.name, str(exc).partition(": ")[2]) from None
    if kind == EntryType.REG:
        return LayerEntry(size=info.size, **common)
    if kind == EntryType.SYMLINK:
        target = os.fsencode(info.linkname)
        if not target or len(target) > 4095 or b"\0" in target:
            raise UnsafeEntry(layer, info.name, "symlink target is empty or too long")
        return LayerEntry(target=target, size=len(target), **common)
    if kind == EntryType.HARDLINK:
        return LayerEntry(link=os.fsencode(info.linkname), **common)
    if kind in (EntryType.CHR, EntryType.BLK):
        return LayerEntry(rdev=(info.devmajor, info.devminor), **common)
    return LayerEntry(**common)

"""Blocks: one zstd frame holding up to MAX_BLOCK_SIZE bytes, named by the SHA-256 of those bytes.

The frame must declare its content size, so a reader knows the output size before inflating and can
refuse a frame that claims more than it may hold (decompression bombs) without allocating it. A
frame may be stored byte-shuffled (lazyfs.format.shuffle), marked by the one skippable frame
SHUFFLED before it (docs/format.md §2.1).
"""
from __future__ import annotations

import hashlib
import threading

import zstandard

from lazyfs.errors import BlockFormatError, DigestMismatch
from lazyfs.format import digest as digests, shuffle as shuffles
from lazyfs.format.guard import total

MAX_BLOCK_SIZE = 16 * 1024 * 1024
# zstd's compress bound for MAX_BLOCK_SIZE (incompressible input grows by ~1/256 plus headers):
# no valid block frame is larger, so readers can refuse bigger bodies before buffering them.
MAX_FRAME_SIZE = MAX_BLOCK_SIZE + MAX_BLOCK_SIZE // 128 + 4096
DEFAULT_LEVEL = 3
# A zstd skippable frame (magic 0x184D2A5C, 4 bytes of payload) naming the filter: the zstd frame
# after it holds the block byte-shuffled with elements of 4 bytes. A zstd tool still inflates the
# file (to the shuffled bytes); no other skippable frame may appear.
SHUFFLED = (0x184D2A5C).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"SHF" + bytes([4])
_SKIPPABLE = range(0x184D2A50, 0x184D2A60)
# The shuffle is tried at this level, the cheapest, and kept where it makes the smaller frame there.
TRIAL_LEVEL = 1

_local = threading.local()


def _cctx(level: int) -> zstandard.ZstdCompressor:
    # Compressor objects are not thread-safe; one per thread and level is cheap and reusable.
    key = f"c{level}"
    ctx = getattr(_local, key, None)
    if ctx is None:
        ctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
        setattr(_local, key, ctx)
    return ctx


def _dctx() -> zstandard.ZstdDecompressor:
    ctx = getattr(_local, "d", None)
    if ctx is None:
        ctx = _local.d = zstandard.ZstdDecompressor()
    return ctx


def encode(data: bytes, level: int = DEFAULT_LEVEL, limit: int = MAX_BLOCK_SIZE,
           shuffle: bool = False) -> tuple[str, bytes]:
    """Return ``(digest, frame)`` for ``data``. ``shuffle``: store it byte-shuffled where that
    compresses better (memory of floats; tried at TRIAL_LEVEL, then compressed at ``level``)."""
    if len(data) > limit:
        raise BlockFormatError(f"object of {len(data)} bytes exceeds the {limit} byte limit")
    digest = digests.compute(data)
    if not shuffle:
        return digest, _cctx(level).compress(data)
    shuffled = shuffles.shuffle(data)
    plain_trial = _cctx(TRIAL_LEVEL).compress(data)
    shuffled_trial = _cctx(TRIAL_LEVEL).compress(shuffled)
    if len(SHUFFLED) + len(shuffled_trial) < len(plain_trial):
        body = shuffled_trial if level == TRIAL_LEVEL else _cctx(level).compress(shuffled)
        return digest, SHUFFLED + body
    return digest, plain_trial if level == TRIAL_LEVEL else _cctx(level).compress(data)


def _split(frame, digest: str | None, shuffled_ok: bool) -> tuple[memoryview, bool]:
    """The zstd frame inside a stored object, and whether it holds the content shuffled."""
    view = memoryview(frame).cast("B")
    if not _skippable(view):
        return view, False
    if view[:len(SHUFFLED)] != SHUFFLED:
        raise BlockFormatError("object starts with an unknown skippable frame", digest)
    if not shuffled_ok:
        raise BlockFormatError("only blocks may be stored shuffled", digest)
    view = view[len(SHUFFLED):]
    if _skippable(view):
        raise BlockFormatError("a second skippable frame after the shuffle's", digest)
    return view, True


def _skippable(view: memoryview) -> bool:
    return len(view) >= 4 and int.from_bytes(view[:4], "little") in _SKIPPABLE


@total("block frame", BlockFormatError)
def declared_size(frame: bytes, digest: str | None = None, limit: int = MAX_BLOCK_SIZE) -> int:
    return _declared_size(_split(frame, digest, True)[0], digest, limit)


def _declared_size(frame, digest: str | None, limit: int) -> int:
    try:
        params = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise BlockFormatError(f"not a zstd frame ({exc})", digest) from None
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN or size == zstandard.CONTENTSIZE_ERROR:
        raise BlockFormatError("zstd frame does not declare its content size", digest)
    if size > limit:
        raise BlockFormatError(f"frame declares {size} bytes, more than the {limit} byte limit", digest)
    return size


@total("block frame", BlockFormatError)
def decompress(frame: bytes, digest: str | None = None, limit: int = MAX_BLOCK_SIZE,
               expected_size: int | None = None, shuffled_ok: bool = True) -> bytes:
    """Inflate one frame without checking its digest (see ``decode`` for the checked form).
    ``shuffled_ok``: whether the object may be stored shuffled (blocks; not manifests, whose
    limit is 16 times a block's and which nothing shuffles)."""
    frame, shuffled = _split(frame, digest, shuffled_ok)
    size = _declared_size(frame, digest, limit)
    if expected_size is not None and size != expected_size:
        raise BlockFormatError(f"frame declares {size} bytes, expected {expected_size}", digest)
    try:
        if size == 0:
            # zstd's one-shot API rejects an empty output buffer; an empty frame is still checked,
            # to its end and for bytes after it.
            inflater = _dctx().decompressobj()
            data = inflater.decompress(frame)
            if not inflater.eof or inflater.unused_data:
                raise BlockFormatError("empty zstd frame cut short or followed by other bytes", digest)
        else:
            data = _dctx().decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise BlockFormatError(f"corrupt zstd frame ({exc})", digest) from None
    if len(data) != size:
        raise BlockFormatError(f"frame inflated to {len(data)} bytes, declared {size}", digest)
    if not shuffled:
        return data
    out = shuffles.unshuffle(data)
    del data  # (a block's inflated bytes are not kept beside its unshuffled copy)
    return bytes(out)


@total("block frame", BlockFormatError)
def decode(digest: str, frame: bytes, expected_size: int | None = None,
           limit: int = MAX_BLOCK_SIZE, shuffled_ok: bool = True) -> bytes:
    """Inflate ``frame`` and return its bytes only if they hash to ``digest``."""
    digests.validate(digest)
    data = decompress(frame, digest, limit, expected_size, shuffled_ok)
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise DigestMismatch(digest, actual)
    return data

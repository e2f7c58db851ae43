"""Blocks: one zstd frame holding up to MAX_BLOCK_SIZE bytes, named by the SHA-256 of those bytes.

The frame must declare its content size, so a reader knows the output size before inflating and can
refuse a frame that claims more than it may hold (decompression bombs) without allocating it.
"""
from __future__ import annotations

import hashlib
import threading

import zstandard

from lazyfs.errors import BlockFormatError, DigestMismatch
from lazyfs.format import digest as digests
from lazyfs.format.guard import total

MAX_BLOCK_SIZE = 16 * 1024 * 1024
# zstd's compress bound for MAX_BLOCK_SIZE (incompressible input grows by ~1/256 plus headers):
# no valid block frame is larger, so readers can refuse bigger bodies before buffering them.
MAX_FRAME_SIZE = MAX_BLOCK_SIZE + MAX_BLOCK_SIZE // 128 + 4096
DEFAULT_LEVEL = 3

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


def encode(data: bytes, level: int = DEFAULT_LEVEL, limit: int = MAX_BLOCK_SIZE) -> tuple[str, bytes]:
    """Return ``(digest, frame)`` for ``data``."""
    if len(data) > limit:
        raise BlockFormatError(f"object of {len(data)} bytes exceeds the {limit} byte limit")
    return digests.compute(data), _cctx(level).compress(data)


def declared_size(frame: bytes, digest: str | None = None, limit: int = MAX_BLOCK_SIZE) -> int:
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
               expected_size: int | None = None) -> bytes:
    """Inflate one frame without checking its digest (see ``decode`` for the checked form)."""
    size = declared_size(frame, digest, limit)
    if expected_size is not None and size != expected_size:
        raise BlockFormatError(f"frame declares {size} bytes, expected {expected_size}", digest)
    try:
        if size == 0:
            # zstd's one-shot API rejects an empty output buffer; an empty frame is still checked.
            data = _dctx().decompressobj().decompress(frame)
        else:
            data = _dctx().decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise BlockFormatError(f"corrupt zstd frame ({exc})", digest) from None
    if len(data) != size:
        raise BlockFormatError(f"frame inflated to {len(data)} bytes, declared {size}", digest)
    return data


@total("block frame", BlockFormatError)
def decode(digest: str, frame: bytes, expected_size: int | None = None,
           limit: int = MAX_BLOCK_SIZE) -> bytes:
    """Inflate ``frame`` and return its bytes only if they hash to ``digest``."""
    digests.validate(digest)
    data = decompress(frame, digest, limit, expected_size)
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise DigestMismatch(digest, actual)
    return data

"""The batch block response (docs/protocol.md, "Batch fetch"): pure encoding, no I/O.

A response is a sequence of records, one per requested digest, in request order:

    <digest> SP <status> SP <length> LF <length bytes of the stored frame>

``status`` is 200 (frame follows), 404 (no such block) or 502 (the origin failed for it; length 0).
The header line is ASCII and at most MAX_HEADER bytes, so a reader never buffers an unbounded line.
"""
from __future__ import annotations

from typing import NamedTuple

from lazyfs.errors import FormatError
from lazyfs.format import digest as digests
from lazyfs.format.block import MAX_FRAME_SIZE
from lazyfs.format.guard import total

MEDIA_TYPE = "application/vnd.lazyfs.blocks.v1"
MAX_HEADER = 100
MAX_DIGESTS = 1024
STATUSES = (200, 404, 502)


class RecordHeader(NamedTuple):
    digest: str
    status: int
    length: int


def encode_header(digest: str, status: int, length: int) -> bytes:
    return f"{digest} {status} {length}\n".encode("ascii")


@total("batch record header")
def decode_header(line: bytes) -> RecordHeader:
    """Parse one header line (with or without its LF); raises FormatError on anything odd."""
    try:
        digest, status, length = line.rstrip(b"\n").decode("ascii").split(" ")
        header = RecordHeader(digests.validate(digest), int(status), int(length))
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"malformed batch record header {line[:MAX_HEADER]!r}") from None
    if header.status not in STATUSES or not 0 <= header.length <= MAX_FRAME_SIZE:
        raise FormatError(f"batch record header out of range: {line[:MAX_HEADER]!r}")
    if header.status != 200 and header.length:
        raise FormatError(f"batch record {digest}: status {status} with a body")
    return header

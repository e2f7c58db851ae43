"""The batch block response (docs/protocol.md, "Batch fetch"): pure encoding, no I/O.

A response is a sequence of records, one per requested digest, in request order:

    <digest> SP <status> SP <length> LF <length bytes of the stored frame>

``status`` is 200 (frame follows), 404 (no such block) or 502 (the origin failed for it; length 0).
The header line is ASCII and at most MAX_HEADER bytes, so a reader never buffers an unbounded line.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from lazyfs.errors import FormatError
from lazyfs.format.block import MAX_FRAME_SIZE
from lazyfs.format.guard import total

MEDIA_TYPE = "application/vnd.lazyfs.blocks.v1"
MAX_HEADER = 100
MAX_DIGESTS = 1024
STATUSES = (200, 404, 502)
_HEADER = re.compile(rb"(sha256:[0-9a-f]{64}) ([0-9]{3}) (0|[1-9][0-9]{0,11})")


class RecordHeader(NamedTuple):
    digest: str
    status: int
    length: int


def encode_header(digest: str, status: int, length: int) -> bytes:
    return f"{digest} {status} {length}\n".encode("ascii")


@total("batch record header")
def decode_header(line: bytes) -> RecordHeader:
    """Parse one header line (with or without its LF); raises FormatError on anything odd."""
    # Exactly the spelling encode_header writes (int() would also take "+2_00", " 7" or "7\r").
    m = _HEADER.fullmatch(line.removesuffix(b"\n"))
    if m is None:
        raise FormatError(f"malformed batch record header {line[:MAX_HEADER]!r}")
    # (the pattern holds the digest's form and the numbers' signs)
    header = RecordHeader(m.group(1).decode(), int(m.group(2)), int(m.group(3)))
    if header.status not in STATUSES or header.length > MAX_FRAME_SIZE:
        raise FormatError(f"batch record header out of range: {line[:MAX_HEADER]!r}")
    if header.status != 200 and header.length:
        raise FormatError(f"batch record {header.digest}: status {header.status} with a body")
    return header

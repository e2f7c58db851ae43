"""The read trace (`lazyfs mount --trace FILE`, docs/format.md §10): one line per read the
kernel sent the mount, which startup profiles and working sets are made from. Pure codec."""
from __future__ import annotations

import json
import math
from typing import Iterable, NamedTuple

from lazyfs.errors import FormatError
from lazyfs.format.guard import number, total, whole


class Read(NamedTuple):
    t: float  # seconds since the mount started, to the microsecond
    path: str  # the file's path in the image, "/"-rooted; non-UTF-8 bytes as surrogate escapes
    offset: int
    size: int  # bytes the read returned


def encode(read: Read) -> str:
    """One trace line, without its newline (write the file with errors="surrogateescape")."""
    return json.dumps({"t": round(read.t, 6), "path": read.path, "offset": read.offset,
                       "size": read.size}, ensure_ascii=False)


@total("read trace line")
def decode(line: str) -> Read:
    r = json.loads(line)
    t, path, offset, size = r["t"], r["path"], r["offset"], r["size"]
    # The types as written, nothing coerced: NaN, "inf", 1.9 or true are not a read.
    if not (number(t) and math.isfinite(t) and t >= 0 and isinstance(path, str) and path.startswith("/")
            and whole(offset) and whole(size)):
        raise FormatError(f"read trace line is not [t ≥ 0, /path, offset ≥ 0, size ≥ 0]: {line[:200]!r}")
    # A path stands for the file's bytes: only U+DC80 to U+DCFF spell a byte that is not UTF-8
    # (surrogateescape). Another lone surrogate, which a JSON escape can spell, is no file's
    # name, and would fail whatever turns the path back into bytes.
    try:
        path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise FormatError(f"read trace line has a path that is no file's bytes: {line[:200]!r}") from None
    return Read(float(t), path, offset, size)


def decode_all(lines: Iterable[str]) -> list[Read]:
    """The reads of a trace file in time order (reads from several threads may be written out of
    order); blank lines are skipped."""
    return sorted((decode(line) for line in lines if line.strip()), key=lambda r: r.t)

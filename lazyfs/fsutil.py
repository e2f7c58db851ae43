"""Writing a file so that its final name never holds a partial file: temp file, then rename."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable


def atomic_write(path: str | os.PathLike, data: bytes, tmp_dir: str | os.PathLike,
                 durable: bool = True, drop_pages: bool = False, rename=os.rename) -> os.stat_result | None:
    """Write ``data`` to a temp file in ``tmp_dir`` (same filesystem), then rename it to ``path``;
    durable, the status of the file written once named (whatever is at ``path`` by the time it
    returns; the node cache's identity of it), else None.

    durable: fsync before the rename, so a power cut leaves the old state or the new, never a
    torn file (stores, and the node cache, whose files the kernel may serve unhashed).
    rename: how the file gets its name (NodeCache.room hands one that also counts it in the node
    cache's ledger, in the same step)."""
    return atomic_write_parts(path, (data,), tmp_dir, durable, drop_pages=drop_pages, rename=rename)


def atomic_write_parts(path: str | os.PathLike, parts: Iterable[bytes],
                       tmp_dir: str | os.PathLike, durable: bool = True,
                       mode: int | None = None, drop_pages: bool = False, rename=os.rename) -> os.stat_result | None:
    """atomic_write of the concatenation of ``parts``, produced one at a time (a file too large
    to hold in memory); ``mode``: the file's permissions, set before it gets its name;
    ``drop_pages``: leave none of the written bytes in the page cache (durable writes only), so
    that pages found there later were read (cached_pages)."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=".part-")
    try:
        # A durable file stays open until named: its status is then this file's, the change
        # time the rename set included (the node cache keeps it as the identity of the file it
        # verified). Without fsync, a delayed write error shows at close: closed before naming.
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            if durable:
                os.fsync(f.fileno())
                if drop_pages:  # clean after the fsync, so the kernel can drop them
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            if durable:
                rename(tmp, Path(path))
                return os.fstat(f.fileno())
        rename(tmp, Path(path))
        return None
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


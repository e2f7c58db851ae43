"""Writing a file so that its final name never holds a partial file (temp file, then rename), and
asking the page cache what of a file it holds."""
from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path
from typing import Iterable


def atomic_write(path: str | os.PathLike, data: bytes, tmp_dir: str | os.PathLike,
                 durable: bool = True, drop_pages: bool = False) -> None:
    """Write ``data`` to a temp file in ``tmp_dir`` (same filesystem), then rename it to ``path``.

    durable: fsync before the rename, so a power cut leaves the old state or the new, never a
    torn file (stores, and the node cache, whose files the kernel may serve unhashed)."""
    atomic_write_parts(path, (data,), tmp_dir, durable, drop_pages=drop_pages)


def atomic_write_parts(path: str | os.PathLike, parts: Iterable[bytes],
                       tmp_dir: str | os.PathLike, durable: bool = True,
                       mode: int | None = None, drop_pages: bool = False) -> None:
    """atomic_write of the concatenation of ``parts``, produced one at a time (a file too large
    to hold in memory); ``mode``: the file's permissions, set before it gets its name;
    ``drop_pages``: leave none of the written bytes in the page cache (durable writes only), so
    that pages found there later were read (cached_pages)."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            if durable:
                f.flush()
                os.fsync(f.fileno())
                if drop_pages:  # clean after the fsync, so the kernel can drop them
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        if mode is not None:
            os.chmod(tmp, mode)
        os.rename(tmp, Path(path))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_SYS_CACHESTAT = 451  # the same number on every architecture (Linux 6.5, the generic table)
_libc = ctypes.CDLL(None, use_errno=True)


def cached_pages(path: str | os.PathLike) -> int | None:
    """How many of the file's pages are in the page cache (cachestat(2)); None where the kernel
    cannot say, 0 for a file that is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOATIME if os.geteuid() == 0 else os.O_RDONLY)
    except FileNotFoundError:
        return 0
    except OSError:
        return None
    try:
        stat = _CacheStat()
        if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_Range(0, 0)), ctypes.byref(stat), 0) != 0:
            return None
        return stat.nr_cache
    finally:
        os.close(fd)

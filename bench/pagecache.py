"""The page cache between timed runs: a cold node starts with the node's page cache dropped.

The servers a bench run talks to (the cache server, the registry, the blob server) stand in for
other machines of a fleet, whose hot files sit in their own memory. Here they share one kernel,
one page cache and one disk with the node, so dropping the node's page cache dropped theirs too,
and a restore's blocks were read from the disk the node was writing to at the same moment. After
each drop their files are therefore read back in, before any clock starts. `lazyfs bench
--cold-servers` keeps the old way: servers as cold as the node, as if each had just started.
"""
from __future__ import annotations

import logging
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger("bench")
# Bytes read back after one drop, at most, newest first: what one bench run's workloads serve
# (torch's blocks, a snapshot and its working set: under 1 GiB) without rereading a bench home's
# whole history before every run (a cache server keeps up to 64 GiB).
MAX_READ_BACK = 2 << 30
_kept: list[Path] = []  # the servers' directories, while servers_kept() holds them
cut_short = False  # whether a read-back stopped at its limit since servers_kept() began


def drop_caches() -> None:
    """Drop the page cache (with dentries and inodes), then read the servers' files back in."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    read_back(_kept)


@contextmanager
def servers_kept(roots: Iterable[Path]) -> Iterator[None]:
    """While inside, drop_caches() reads every file under ``roots`` back in after it drops, in
    the order given."""
    global cut_short
    cut_short = False
    added = [Path(r) for r in roots]
    _kept.extend(added)
    try:
        yield
    finally:
        for root in added:
            _kept.remove(root)


def read_back(roots: Iterable[Path], limit: int = MAX_READ_BACK) -> int:
    """Read the regular files under ``roots`` into the page cache, each root's most recently
    changed first (a cache server's disk cache marks what it serves), up to ``limit`` bytes in
    all (then say so); returns the bytes read. Files that go meanwhile (a cache evicting) are
    skipped."""
    global cut_short
    done = 0
    buf = bytearray(1 << 20)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (os.O_NOATIME if os.geteuid() == 0 else 0)
    for root in roots:
        for path in _newest_first(root):
            if done >= limit:
                if not cut_short:  # (once: it would say the same before every run)
                    log.warning("bench: read %d MiB of the servers' files back into the page "
                                "cache, and no more", done >> 20)
                cut_short = True
                return done
            try:
                fd = os.open(path, flags)
            except OSError:
                continue
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                while done < limit and (n := os.readv(fd, [memoryview(buf)[:limit - done]])):
                    done += n
            except OSError:
                pass
            finally:
                os.close(fd)
    return done


def _newest_first(root: Path) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            try:
                found.append((os.lstat(path).st_mtime, path))
            except OSError:
                pass
    return [path for _, path in sorted(found, reverse=True)]

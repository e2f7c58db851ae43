"""The node cache's size cap: least recently used files go first, startup-profile blocks last.

Recency is max(atime, mtime): a FUSE mount touches a block it serves, and what the kernel serves
(lazyfs.fs.kernel) gets its access time from the kernel. Blocks listed in the startup profile of
an image the node has mounted are evicted only when nothing else is left to evict: they are what
the next cold start of that image reads first (docs/node.md has the measurement).

Evicting is safe beside running mounts, which is why this needs no lock: a file that is open keeps
its bytes until closed, and a block that vanished before a read is fetched again (the FUSE path's
NodeCache.read retries; on the kernel path overlayfs falls through to the FUSE data layer). A read
never sees wrong bytes, only a refetch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

SUBDIRS = ("blocks", "objects", "erofs")
TRIM_TO = 0.9  # a trim goes below the cap, so the next one is not one block away


@dataclass
class TrimReport:
    files: int = 0
    bytes_before: int = 0
    evicted: int = 0
    evicted_bytes: int = 0
    kept_profile: int = 0  # profile blocks that survived because other files could go


def _files(root: str | os.PathLike) -> list[tuple[float, int, str]]:
    out = []
    for sub in SUBDIRS:
        for dirpath, _, names in os.walk(Path(root, sub)):
            for name in names:
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                out.append((max(st.st_mtime, st.st_atime), st.st_size, path))
    return out


def usage(root: str | os.PathLike) -> tuple[int, int]:
    """(files, bytes) in the cache."""
    files = _files(root)
    return len(files), sum(size for _, size, _ in files)


def trim(root: str | os.PathLike, max_bytes: int, keep_longer: Iterable[str] = (),
         dry_run: bool = False, below: float = TRIM_TO) -> TrimReport:
    """Evict until the cache holds at most ``max_bytes`` (``below`` × that, once it was over).
    ``keep_longer``: block digests (hex or sha256:hex) to evict only after everything else."""
    keep = {d.removeprefix("sha256:") for d in keep_longer}
    files = _files(root)
    report = TrimReport(files=len(files), bytes_before=sum(size for _, size, _ in files))
    total = report.bytes_before
    if total <= max_bytes:
        return report
    goal = int(max_bytes * below)
    order = sorted(files, key=lambda f: (os.path.basename(f[2]) in keep, f[0]))
    for _, size, path in order:
        if total <= goal:
            break
        report.evicted += 1
        report.evicted_bytes += size
        total -= size
        if not dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    report.kept_profile = sum(1 for _, _, p in files if os.path.basename(p) in keep and os.path.exists(p))
    return report


def keep_longer(shared_mounts) -> set[str]:
    """The startup-profile blocks of the images the agent has mounted (lazyfs.node.table.Shared)."""
    out: set[str] = set()
    for s in shared_mounts:
        out |= set(s.profile_blocks)
    return out

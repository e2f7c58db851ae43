"""Which mounts a snapshot is, as containerd's overlay snapshotter answers. Pure, no I/O.

containerd performs the mounts itself (for a container, and to unpack a layer into an active
snapshot), so the answer must be exactly what its overlay snapshotter would give for the same
directories: its diff applier recognises an overlay mount with one ``upperdir`` and writes a
layer straight into it, whiteouts as overlay whiteouts.

``lowers`` are the directories below the snapshot, nearest first: committed snapshots' ``fs``
directories, ending (when an ancestor is served by lazyfs) with that image's shared mount, which
holds its whole chain.
"""
from __future__ import annotations

from typing import NamedTuple


class Mount(NamedTuple):
    type: str
    source: str
    options: tuple[str, ...]


def active(upper: str, work: str, lowers: list[str]) -> list[Mount]:
    """A writable snapshot: its own ``fs`` directory alone, or over its lowers."""
    if not lowers:
        return [Mount("bind", upper, ("rw", "rbind"))]
    return [Mount("overlay", "overlay", (f"workdir={work}", f"upperdir={upper}",
                                         "lowerdir=" + ":".join(lowers)))]


def view(own: str, lowers: list[str]) -> list[Mount]:
    """A read-only snapshot: its parent's tree (or its own empty directory, without a parent)."""
    if not lowers:
        return [Mount("bind", own, ("ro", "rbind"))]
    if len(lowers) == 1:
        return [Mount("bind", lowers[0], ("ro", "rbind"))]
    # overlayfs needs two lowers at least to mount without an upper directory.
    return [Mount("overlay", "overlay", ("lowerdir=" + ":".join(lowers),))]


def check_path(path: str) -> str:
    """A directory that goes into an overlay option: ',' and ':' would split the option."""
    if "," in path or ":" in path:
        raise ValueError(f"path {path!r} cannot be an overlay layer (it contains ',' or ':')")
    return path

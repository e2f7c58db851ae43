"""The snapshot's writable layer: what the snapshotted process wrote into its container (the
overlay's upper directory), in the form the snapshot carries it.

- ``upper.erofs``: an EROFS image of that directory (mkfs.erofs, at snapshot time). A restore
  mounts it from its file as the topmost read-only layer, under a new, empty writable one, so
  there is nothing to unpack before `criu restore`. (The bench's torch program leaves 690 files
  there, the byte code its first start compiled: tar took 45-90 ms of CPU unpacking them on the
  restore's path, while the page server and the image mount needed both cores.)
  The restored process sees the same files; what it opens for writing (an open log, a file it
  maps shared and writable) CRIU reopens through the overlay, which copies it up first.
- ``upper.tar``: where the snapshotting machine cannot make or mount that image (no erofs-utils,
  a kernel before file-backed EROFS mounts), and in snapshots made before. A restore unpacks it
  into the writable layer.

Whiteouts, opaque directories, owners, modes, times and extended attributes survive either way
(mkfs.erofs and tar --xattrs keep them; overlayfs honours whiteouts in a lower layer as in the
upper one).

The container's /dev/shm is a tmpfs of its own, outside that layer: POSIX shared memory and
semaphores a process keeps by name (multiprocessing's SharedMemory, sem_open) live there, open
or mapped, and CRIU reopens them by path. A snapshot carries what it held as ``dev-shm.tar``
(only when it held anything), and a restore unpacks it into the new /dev/shm before criu runs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from lazyfs.errors import RunError
from lazyfs.fs import kernel

EROFS, TAR = "upper.erofs", "upper.tar"
NAMES = (EROFS, TAR)
SHM = "dev-shm.tar"
TAR_ARGS = ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner"]  # both ways, one spelling


def pack(upper: Path, out: Path) -> str:
    """Write the writable layer ``upper`` into ``out``; its file name."""
    if shutil.which("mkfs.erofs") and kernel.unavailable() is None:
        part = out / (EROFS + ".part")
        made = subprocess.run(["mkfs.erofs", "--quiet", "--preserve-mtime", str(part), str(upper)],
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise RunError(f"making the writable layer's image failed: "
                           f"{(made.stderr or made.stdout).strip()}")
        os.rename(part, out / EROFS)
        return EROFS
    _tar(["-C", str(upper), "-cf", str(out / TAR), "."], "archiving the writable layer")
    return TAR


def unpack_tar(archive: Path, upper: Path) -> None:
    """A ``upper.tar`` into the (empty) writable layer."""
    upper.mkdir(parents=True, exist_ok=True)
    _tar(["-xpf", str(archive), "-C", str(upper)], "unpacking the snapshot's writable layer")


def pack_shm(shm: Path, out: Path) -> str | None:
    """What the container's /dev/shm (``shm``) holds, into ``out``; its file name, or None when
    it holds nothing."""
    with os.scandir(shm) as entries:
        if next(entries, None) is None:
            return None
    _tar(["-C", str(shm), "-cf", str(out / SHM), "."], "archiving the container's /dev/shm")
    return SHM


def unpack_shm(archive: Path, shm: Path) -> None:
    """A ``dev-shm.tar`` into the container's new, empty /dev/shm."""
    _tar(["-xpf", str(archive), "-C", str(shm)], "unpacking the snapshot's /dev/shm")


def _tar(args: list[str], what: str) -> None:
    tar = subprocess.run([*TAR_ARGS, *args], capture_output=True, text=True)
    if tar.returncode != 0:
        raise RunError(f"{what} failed: {tar.stderr.strip()}")


def which(snap_dir: Path) -> str:
    """The form of the writable layer a fetched snapshot holds."""
    for name in NAMES:
        if (snap_dir / name).exists():
            return name
    raise RunError(f"the snapshot has no writable layer ({' or '.join(NAMES)})")

"""The kernel-served data path: the image's EROFS metadata image under overlayfs, with its file
bytes in data-only lower layers (docs/architecture.md, "The kernel data path").

    mountpoint  overlay, read-only: lowerdir=META::BLOCKS::OBJECTS::FUSE
    META        the EROFS image of the manifest (lazyfs.format.erofs), file-backed, read-only
    BLOCKS      the node cache's verified blocks: every one-chunk file the node holds
    OBJECTS     whole multi-chunk files the node holds (lazyfs.cache.completer)
    FUSE        the daemon's mount of every object (lazyfs.fs.dataindex), fetching what is missing

overlayfs takes a file's bytes from the first data layer that has its object, so metadata never
leaves the kernel and neither do reads of data already on local disk. Mounts are mount(2) calls
(about 1 ms together), not mount(8) runs.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import MountError
from lazyfs.cache import layout as cachelayout
from lazyfs.proc import syscalls as sc

MODES = ("auto", "kernel", "fuse")  # --data-path
MIN_KERNEL = (6, 12)  # file-backed EROFS mounts (6.12); overlayfs data-only layers came in 6.5


@dataclass(frozen=True)
class Layout:
    image: Path
    meta: Path
    locals: tuple[Path, ...]
    fuse: Path
    # The manifest's verified bytes, when the process that mounts had them (the node agent read
    # them to resolve the image): the daemon reads them from here, checks them again and removes
    # the file, instead of fetching them a second time.
    manifest: Path

    def lowerdir(self) -> str:
        data = [*self.locals, self.fuse]
        return escape(self.meta) + "".join("::" + escape(d) for d in data)


def layout(cache_dir: str | os.PathLike, digest: str, runtime_dir: str | os.PathLike) -> Layout:
    """Where everything of one kernel-path mount lives. The image and data layers are per node
    (they depend only on the manifest and the node cache); the mountpoints are per mount."""
    rt = Path(runtime_dir)
    return Layout(image=cachelayout.erofs_image(cache_dir, digest), meta=rt / "meta",
                  locals=(cachelayout.blocks_dir(cache_dir), cachelayout.objects_dir(cache_dir)),
                  fuse=rt / "data", manifest=rt / "manifest")


def unavailable() -> str | None:
    """Why this machine cannot use the kernel path, or None if it can."""
    if os.geteuid() != 0:
        return "mounting EROFS and overlayfs needs root"
    try:
        with open("/proc/filesystems") as f:
            have = {line.split()[-1] for line in f if line.strip()}
    except OSError as exc:
        return f"cannot read /proc/filesystems ({exc.strerror})"
    for fs in ("erofs", "overlay"):
        if fs not in have:
            return f"the kernel has no {fs} filesystem"
    try:
        release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return None
    if release < MIN_KERNEL:
        return (f"kernel {os.uname().release} predates file-backed EROFS mounts "
                f"({MIN_KERNEL[0]}.{MIN_KERNEL[1]})")
    return None


def mount(lay: Layout, target: str) -> None:
    """Mount the metadata image and the overlay on ``target``; on failure nothing stays mounted."""
    lay.meta.mkdir(parents=True, exist_ok=True)
    for d in (*lay.locals, lay.image.parent):
        # The kernel serves these files unhashed (docs/security.md): only root may change them,
        # whoever made the directories first (a cache directory shared with a user's mounts).
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, 0, 0)
        os.chmod(d, 0o700)
    mount_one(str(lay.image), str(lay.meta), "erofs", sc.MS_RDONLY | sc.MS_NODEV, None)
    try:
        mount_one("overlay", target, "overlay", sc.MS_RDONLY | sc.MS_NODEV | sc.MS_NOSUID,
               "lowerdir=" + lay.lowerdir())
    except BaseException:
        unmount_one(str(lay.meta), lazy=True)
        raise


def unmount_one(path: str, lazy: bool = False) -> bool:
    """umount2(2); True if it is gone (or was never mounted), False while busy."""
    try:
        sc.umount(path, sc.MNT_DETACH if lazy else 0)
        return True
    except OSError as exc:
        err = exc.errno
    if err in (errno.EINVAL, errno.ENOENT):
        return True  # not a mountpoint (any more)
    if err == errno.EBUSY:
        return False
    raise MountError(f"unmounting {path} failed: {os.strerror(err)}")


def mount_one(source: str, target: str, fstype: str, flags: int, data: str | None) -> None:
    """mount(2), with a MountError that says which mount failed and why."""
    try:
        sc.mount(source, target, fstype, flags, data)
    except OSError as exc:
        raise MountError(exc.strerror + (" (a kernel without this feature: use --data-path fuse)"
                                         if exc.errno in (errno.EINVAL, errno.ENOTBLK, errno.EOPNOTSUPP)
                                         else "")) from None


def escape(path: Path) -> str:
    """overlayfs option syntax: ':' separates layers and ',' options; a backslash escapes both."""
    return str(path).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")

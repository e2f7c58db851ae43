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
import fcntl
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import MountError
from lazyfs.cache import cap, layout as cachelayout
from lazyfs.proc import syscalls as sc

log = logging.getLogger("lazyfs.mount")
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
    cache: Path  # the node cache's directory (take_over)

    def lowerdir(self) -> str:
        data = [*self.locals, self.fuse]
        return escape(self.meta) + "".join("::" + escape(d) for d in data)


def layout(cache_dir: str | os.PathLike, digest: str, runtime_dir: str | os.PathLike) -> Layout:
    """Where everything of one kernel-path mount lives. The image and data layers are per node
    (they depend only on the manifest and the node cache); the mountpoints are per mount."""
    rt = Path(runtime_dir)
    return Layout(image=cachelayout.erofs_image(cache_dir, digest), meta=rt / "meta",
                  locals=(cachelayout.blocks_dir(cache_dir), cachelayout.objects_dir(cache_dir)),
                  fuse=rt / "data", manifest=rt / "manifest", cache=Path(cache_dir))


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
    # The daemon took the cache over before it wrote anything (take_over); the kernel reads
    # these files from here on, so what is not root's alone now is taken over again.
    if not all(_roots_alone(lay.cache / name) for name in TAKE_OVER):
        take_over(lay.cache)
    mount_one(str(lay.image), str(lay.meta), "erofs", sc.MS_RDONLY | sc.MS_NODEV, None)
    try:
        mount_one("overlay", target, "overlay", sc.MS_RDONLY | sc.MS_NODEV | sc.MS_NOSUID,
               "lowerdir=" + lay.lowerdir())
    except BaseException:
        unmount_one(str(lay.meta), lazy=True)
        raise


TAKE_OVER = (cachelayout.TMP, cachelayout.BLOCKS, cachelayout.OBJECTS, cachelayout.EROFS)


def take_over(cache_dir: str | os.PathLike) -> None:
    """Make the node cache's ``tmp/``, ``blocks/``, ``objects/`` and ``erofs/`` root's alone
    (owner root, mode 0700) and drop from them whatever a user other than root could have
    written: the kernel serves these files with no hash (docs/security.md, "What the kernel
    data path trusts on local disk"). A cache directory may have been made by a user's own
    FUSE-path mounts first, and then what it holds proves nothing:

    * a directory not root's, or writable by others, is dropped with all it holds (a user can
      rename files within it: a root-owned block under another block's name);
    * if ``tmp/`` was, so is everything in the other three: every file there was written in
      ``tmp/`` and renamed into place, and a user could swap a temp file before that rename;
    * in directories that are root's, a subdirectory of ``blocks/`` or ``objects/`` that is not
      (made while its parent was a user's) is dropped, and so is a file of ``erofs/`` that is
      not root's, or anything there that is not a plain file.

    Nothing is followed through a symbolic link. Call before anything writes into the cache;
    MountError if a directory cannot be made root's."""
    root = Path(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = os.open(root / cachelayout.TAKE_OVER_LOCK,
                       os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # (two mounts starting at once: one takes over)
            dropped = _sweep_dropped(root)
            tmp_kept = _own_dir(root, cachelayout.TMP, drop=False)
            for name in TAKE_OVER[1:]:
                if not _own_dir(root, name, drop=not tmp_kept):
                    dropped = True
                    continue  # (empty now)
                with os.scandir(root / name) as entries:
                    for entry in entries:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:  # (evicted meanwhile, by a trim)
                            continue
                        if name == cachelayout.EROFS:
                            ok = stat.S_ISREG(st.st_mode) and _roots(st)
                        else:  # (only subdirectories are looked in; a stray file is never served)
                            ok = stat.S_ISREG(st.st_mode) or (stat.S_ISDIR(st.st_mode) and _roots(st))
                        if not ok:
                            log.warning("node cache: dropping %s (owner %d, mode %o): not root's alone",
                                        entry.path, st.st_uid, st.st_mode)
                            _drop(root, Path(entry.path))
                            dropped = True
        finally:
            os.close(lock)
    except OSError as exc:
        raise MountError(f"cannot make the node cache {root} root's alone for the kernel data "
                         f"path: {exc}") from None
    if dropped:  # (the ledger counted what is gone now: a walk sets it right)
        cap.ledger(root).reconcile()


def _roots_alone(path: Path) -> bool:
    """Whether ``path`` is a directory (not a link to one) of root's, mode 0700."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(st.st_mode) and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o700)


def _roots(st: os.stat_result) -> bool:
    """Whether only root can have changed what this directory lists (or this file holds)."""
    return st.st_uid == 0 and not st.st_mode & 0o022


def _own_dir(root: Path, name: str, drop: bool) -> bool:
    """Make ``root/name`` a directory of root's, mode 0700; True if what was there is kept,
    False if it was dropped (not root's, writable by others, not a directory, or ``drop``)."""
    path = root / name
    kept = True
    for _ in range(4):  # (a link replaced by a directory, then checked, takes three)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                os.mkdir(path, 0o700)
                drop = False  # (nothing in it was written through anything)
            except FileExistsError:
                pass  # (made meanwhile: checked like any)
            continue
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            log.warning("node cache: %s is not a directory; replacing it", path)
            _drop(root, path)  # a symbolic link or a file: never followed
            kept = False
            continue
        try:
            st = os.fstat(fd)
            if _roots(st) and not drop:
                if st.st_gid != 0 or stat.S_IMODE(st.st_mode) != 0o700:
                    os.fchown(fd, 0, 0)
                    os.fchmod(fd, 0o700)
                return kept
        finally:
            os.close(fd)
        log.warning("node cache: %s %s; dropping what it holds before the kernel data path uses it",
                    path, "was written through a temporary directory that was not root's" if drop
                    else f"was not root's alone (owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
        _drop(root, path)
        kept, drop = False, False
    raise MountError(f"{path} keeps being replaced while it is made root's")


def _drop(root: Path, path: Path) -> None:
    """Take ``path`` out of the cache at once (a rename: nothing can be served from it after),
    then remove it; a directory is made root's first, level by level, so that nothing more can
    be put in it while it is emptied."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    aside = root / f"{cachelayout.DROPPED}{path.name}-{secrets.token_hex(4)}"
    os.rename(path, aside)
    _remove(aside)


def _sweep_dropped(root: Path) -> bool:
    """Remove what an earlier take-over dropped and could not remove (it was killed meanwhile);
    whether there was any."""
    found = False
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith(cachelayout.DROPPED):
                _remove(Path(entry.path))
                found = True
    return found


def _remove(path: Path) -> None:
    """Remove a dropped directory; one that cannot be is left for the next take-over (it is out
    of the cache already)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _empty(fd)
        finally:
            os.close(fd)
        os.rmdir(path)
    except (OSError, RecursionError) as exc:
        log.error("node cache: cannot remove %s, which was dropped from it: %s", path, exc)


def _empty(fd: int) -> None:
    """Remove everything in the directory ``fd``, which is made root's 0700 first (its owner,
    were it a user, could otherwise go on adding to it)."""
    os.fchown(fd, 0, 0)
    os.fchmod(fd, 0o700)
    for name in os.listdir(fd):
        try:
            if not stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                os.unlink(name, dir_fd=fd)
                continue
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            try:
                _empty(sub)
            finally:
                os.close(sub)
            os.rmdir(name, dir_fd=fd)
        except FileNotFoundError:
            pass


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

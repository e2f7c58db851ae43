"""``dir:ROOTFS``: a root filesystem directory read as a single layer (no whiteout semantics)."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from lazyfs.errors import ImageSourceError, LimitExceeded
from lazyfs.format.manifest import EntryType

from imagebuilder.tree import MAX_DEPTH, LayerEntry, split_path

PATH_MAX = os.pathconf("/", "PC_PATH_MAX")  # bytes in a path, its NUL included
_KINDS = {stat.S_IFREG: EntryType.REG, stat.S_IFDIR: EntryType.DIR, stat.S_IFLNK: EntryType.SYMLINK,
          stat.S_IFCHR: EntryType.CHR, stat.S_IFBLK: EntryType.BLK, stat.S_IFIFO: EntryType.FIFO,
          stat.S_IFSOCK: EntryType.SOCK}


def _xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    out = []
    for name in names:
        try:
            out.append((name.encode(), os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            continue  # vanished or not readable by us
    return tuple(sorted(out))


def _open_as(name: bytes, st: os.stat_result, flags: int, dir_fd: int | None) -> int:
    """``name`` (in ``dir_fd``) opened without following a symlink, and only if it is still the
    file lstat saw: a tree that changes while it is read (a live container's) must not lead the
    build through a symlink swapped in to another file (the host's), nor hang it on a FIFO."""
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise OSError(errno.ESTALE, "replaced")
    os.set_blocking(fd, True)  # (O_NONBLOCK was for the open only)
    return fd


def _opened(root: Path, rel: bytes, name: bytes, st: os.stat_result, flags: int, dir_fd: int | None) -> int:
    try:
        return _open_as(name, st, flags, dir_fd)
    except OSError as exc:
        # ELOOP, ENOTDIR: what O_NOFOLLOW and O_DIRECTORY say of a symlink swapped in
        why = "replaced while it was read (did the tree change meanwhile?)" \
            if exc.errno in (errno.ESTALE, errno.ELOOP, errno.ENOTDIR) else exc.strerror
        raise ImageSourceError(f"{root}: {os.fsdecode(rel) or '/'!r}: {why}") from None


def walk(root: Path, on_entry: Callable[[LayerEntry, BinaryIO | None], None],
         on_read: Callable[[int], None] | None = None) -> None:
    """Every entry under ``root``, depth first, each directory's names in order. Entries are
    reached from their directory's descriptor (opened and checked as the walk went down), never
    by a whole path again: a directory swapped for a symlink while the tree is read cannot lead
    the walk out of it."""
    base = os.fsencode(root)
    seen: dict[tuple[int, int], bytes] = {}
    try:
        top = os.lstat(base)
    except OSError as exc:
        raise ImageSourceError(f"{root}: {exc.strerror}") from None
    frames: list[tuple[int, bytes, Iterator[bytes]]] = []  # (directory's fd, its path, names left)

    def entry(rel: bytes, name: bytes, dir_fd: int | None) -> None:
        # The tree's own checks (depth, name and path length) first: a path past PATH_MAX is
        # legal in an image, but this host could not name it to the tools that read it later.
        split_path(str(root), rel)
        full_len = len(base) + 1 + len(rel)
        if full_len >= PATH_MAX:
            raise LimitExceeded(f"{root}: entry {rel[:64].decode(errors='replace')!r}...: "
                                f"{full_len} bytes from / is longer than this host's PATH_MAX "
                                f"({PATH_MAX}); build from a shorter directory or an archive")
        st = top if dir_fd is None else os.lstat(name, dir_fd=dir_fd)
        kind = _KINDS.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            return
        # (xattrs by the directory's descriptor too: /proc/self/fd/N/NAME resolves NAME in it)
        where = name if dir_fd is None else b"/proc/self/fd/%d/%s" % (dir_fd, name)
        common = dict(path=rel, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                      mtime_ns=st.st_mtime_ns, xattrs=_xattrs(where))
        if kind != EntryType.DIR and st.st_nlink > 1:
            first = seen.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                on_entry(LayerEntry(type=EntryType.HARDLINK, link=first, **common), None)
                return
        if kind == EntryType.REG:
            with os.fdopen(_opened(root, rel, name, st, os.O_RDONLY, dir_fd), "rb") as f:
                on_entry(LayerEntry(type=kind, size=st.st_size, **common), f)
            if on_read:
                on_read(st.st_size)
        elif kind == EntryType.SYMLINK:
            target = os.readlink(name, dir_fd=dir_fd)
            on_entry(LayerEntry(type=kind, target=target, size=len(target), **common), None)
        elif kind in (EntryType.CHR, EntryType.BLK):
            on_entry(LayerEntry(type=kind, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)), **common), None)
        else:
            on_entry(LayerEntry(type=kind, **common), None)
        if kind == EntryType.DIR:
            fd = _opened(root, rel, name, st, os.O_RDONLY | os.O_DIRECTORY, dir_fd)
            try:
                names = sorted(map(os.fsencode, os.listdir(fd)))  # (listed by fd: str names)
            except BaseException:
                os.close(fd)
                raise
            frames.append((fd, rel, iter(names)))

    try:
        entry(b"", base, None)
        while frames:
            fd, rel, names = frames[-1]
            name = next(names, None)
            if name is None:
                os.close(fd)
                frames.pop()
                continue
            entry(rel + b"/" + name if rel else name, name, fd)
    finally:
        for fd, _, _ in frames:
            os.close(fd)


def tree_size(root: Path) -> int:
    """Bytes in the regular files under ``root``, for the progress bar: with a stack of its own,
    not os.walk, whose recursion a deep tree turns into a RecursionError, and no deeper than the
    walk may go (it refuses what lies below)."""
    total = 0
    stack = [(os.fsencode(root), 0)]
    while stack:
        path, depth = stack.pop()
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue  # unreadable or vanished: the walk reports what matters
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if depth < MAX_DEPTH:
                        stack.append((e.path, depth + 1))
                elif e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


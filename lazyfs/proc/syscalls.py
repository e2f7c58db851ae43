"""mount(2), umount2(2), unshare(2), sethostname(2), prctl(2) and cachestat(2) through the C
library, each failure an OSError with its errno and what was being done (cachestat: None); callers
turn it into their own error.

Standard library only: the namespaces runtime's init (lazyfs.runner.nsinit) runs as
``python -I -S`` and imports this after putting the directory above lazyfs on its path. The C library is the one already loaded
(ctypes.util.find_library would fork ldconfig on every start).
"""
from __future__ import annotations

import ctypes
import os

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 0x4000, 1 << 18
MNT_DETACH = 2
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_GET_PDEATHSIG, PR_SET_NAME = 1, 2, 15
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)),
           f"{fstype or source} mount on {target} failed")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"unmounting {target} failed")


def make_mounts_private() -> None:
    """Every mount of this mount namespace private (--propagation private), recursively."""
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    """Join the namespace ``fd`` (an open /proc/PID/ns/* file) of kind ``nstype`` (os.setns is
    Python 3.12's)."""
    _check(_libc.setns(fd, nstype), "setns")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def set_name(name: str) -> None:
    """PR_SET_NAME: the name ps -o comm, top and perf show for this process (15 bytes at most).
    The node's processes are forks of one interpreter, each "python" otherwise: the agent, its
    fork server, each run, each image's mount daemon, each restore's page server."""
    _libc.prctl(PR_SET_NAME, os.fsencode(name)[:15], 0, 0, 0)


def die_with_parent(sig: int) -> None:
    """PR_SET_PDEATHSIG: ``sig`` when the parent thread dies (as unshare --kill-child)."""
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def parent_death_signal() -> int:
    """PR_GET_PDEATHSIG: the signal die_with_parent set (0: none)."""
    sig = ctypes.c_int(0)
    _libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(sig), 0, 0, 0)
    return sig.value


def peer_credentials(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket, from the kernel
    (SO_PEERCRED). (socket and struct imported here: nsinit imports this module on every
    container start, and needs neither.)"""
    import socket
    import struct
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_SYS_CACHESTAT = 451  # the same number on every architecture (Linux 6.5, the generic table)


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

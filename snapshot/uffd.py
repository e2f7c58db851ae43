"""The userfaultfd ABI a lazy restore needs (linux/userfaultfd.h): event messages and the COPY,
ZEROPAGE, WAKE and UNREGISTER ioctls on a descriptor `criu restore --lazy-pages` hands over.

Errors that mean "nothing to do here" are folded into return values, as CRIU's own handler does:
EEXIST (the page is already there), ENOENT (the range is no longer registered: unmapped or
removed), ESRCH (the process is gone). Anything else raises OSError.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import struct
from dataclasses import dataclass

PAGE = 4096
MSG_SIZE = 32
EVENT_PAGEFAULT, EVENT_FORK, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP = 0x12, 0x13, 0x14, 0x15, 0x16


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (0xAA << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (0xAA << 8) | nr


UFFDIO_UNREGISTER = _ior(0x01, 16)
UFFDIO_WAKE = _ior(0x02, 16)
UFFDIO_COPY = _iowr(0x03, 40)
UFFDIO_ZEROPAGE = _iowr(0x04, 32)
GONE = "gone"  # the process behind the descriptor has exited


@dataclass(frozen=True)
class Event:
    kind: int
    a: int = 0  # PAGEFAULT: address; FORK: new descriptor; REMAP: from; REMOVE/UNMAP: start
    b: int = 0  # REMAP: to; REMOVE/UNMAP: end
    c: int = 0  # REMAP: length


def parse(buf: bytes) -> list[Event]:
    """The messages in what one read() of a userfaultfd returned (whole 32-byte messages)."""
    out = []
    for off in range(0, len(buf) - len(buf) % MSG_SIZE, MSG_SIZE):
        kind = buf[off]
        x, y, z = struct.unpack_from("<QQQ", buf, off + 8)
        if kind == EVENT_PAGEFAULT:
            out.append(Event(kind, y))
        elif kind == EVENT_FORK:
            out.append(Event(kind, x & 0xFFFFFFFF))
        elif kind == EVENT_REMAP:
            out.append(Event(kind, x, y, z))
        else:
            out.append(Event(kind, x, y))
    return out


BENIGN = (errno.EEXIST, errno.ENOENT, errno.ESRCH, errno.ENOSPC, errno.EAGAIN)


def _ioctl(fd: int, request: int, arg: bytearray, benign=BENIGN) -> int:
    """0 on success, else the errno for the benign cases; raises for the rest."""
    try:
        fcntl.ioctl(fd, request, arg, True)
        return 0
    except OSError as exc:
        if exc.errno in benign:
            return exc.errno
        raise


def copy(fd: int, dst: int, data, offset: int, length: int) -> int:
    """Map ``length`` bytes of ``data`` (bytes) from ``offset`` at ``dst`` and wake the threads
    waiting there. Returns 0, or the benign errno; on EEXIST/ENOENT part way, callers retry per
    page (the kernel does not say which page stopped it in a way worth trusting here)."""
    if offset < 0 or length < 0 or offset + length > len(data):  # (the kernel reads what it is told)
        raise ValueError(f"a copy of {length} bytes at {offset} from {len(data)} bytes")
    base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    arg = bytearray(struct.pack("<QQQQq", dst, base + offset, length, 0, 0))
    return _ioctl(fd, UFFDIO_COPY, arg)


def copy_run(fd: int, page: int, off: int, count: int, data: bytes) -> tuple[int, int]:
    """Copy a run of pages: (0, or the errno that stopped it, pages copied). Part of the run
    there or gone already (EEXIST, ENOENT): page by page, each such page passed over."""
    rc = copy(fd, page * PAGE, data, off, count * PAGE)
    if rc not in (errno.EEXIST, errno.ENOENT, errno.EAGAIN):
        return rc, count
    for k in range(count):
        rc = copy(fd, (page + k) * PAGE, data, off + k * PAGE, PAGE)
        if rc in (errno.EAGAIN, errno.ESRCH, errno.ENOSPC):
            return rc, k
    return 0, count


def zeropage(fd: int, dst: int, length: int = PAGE) -> int:
    return _ioctl(fd, UFFDIO_ZEROPAGE, bytearray(struct.pack("<QQQq", dst, length, 0, 0)))


def wake(fd: int, start: int, length: int = PAGE) -> int:
    return _ioctl(fd, UFFDIO_WAKE, bytearray(struct.pack("<QQ", start, length)))


def unregister(fd: int, start: int, length: int) -> int:
    # ENOMEM says either that the process has gone (its mm with it) or that the kernel could not
    # split the mapping (vm.max_map_count) of a process that runs on: not which. Neither is an
    # error here; see Handler._remove.
    return _ioctl(fd, UFFDIO_UNREGISTER, bytearray(struct.pack("<QQ", start, length)),
                  BENIGN + (errno.ENOMEM,))

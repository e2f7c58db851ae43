"""Memory a fork wipes, wiped in every restored copy.

The kernel zeroes memory marked MADV_WIPEONFORK (MAP_DROPPABLE implies it) in a fork's child.
Random number generators keep their state there and take zeroes for "a fork happened: draw a new
key": glibc's getrandom() from 2.41 (the kernel's vDSO generator, under Python's os.urandom),
BoringSSL and AWS-LC. A restored copy is such a child of the snapshot, but CRIU (4.1.1) gives
back the bytes and not the flag. So every copy restored while the kernel's generator was in the
generation it had at the snapshot (it moves about once a minute) drew the snapshot's key: on
Debian trixie, three restores in a row printed the same os.urandom() bytes.

A snapshot therefore records these ranges of each process (``recorded``, from /proc/PID/smaps
of the tree criu left stopped as it dumped it), and a restore, its tree left stopped by criu,
zeroes them in every restored process (``wipe``) before any task runs on, as a fork would have.
The snapshot helper marks its own process's ranges wipe-on-fork again (``record`` says which), for
the forks after the restore.
"""
from __future__ import annotations

import array
import json
import mmap
import os
from pathlib import Path

from lazyfs.errors import RunError
from snapshot import procs

PAGE = mmap.PAGESIZE  # (/proc/PID/pagemap has an entry a page)
_ZEROS = bytes(1 << 20)


def ranges(pid: int) -> list[list[int]]:
    """The [start, end) ranges of ``pid``'s memory marked wipe-on-fork ("wf" in smaps'
    VmFlags), in address order."""
    out: list[list[int]] = []
    span = None
    with open(f"/proc/{pid}/smaps", "rb") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(b":"):  # a mapping's first line: "start-end perms ..."
                start, end = head.split(b"-")
                span = [int(start, 16), int(end, 16)]
            elif head == b"VmFlags:" and b"wf" in line.split()[1:] and span is not None:
                if out and out[-1][1] == span[0]:
                    out[-1][1] = span[1]  # (adjacent mappings: one range)
                else:
                    out.append(span)
    return out


def recorded(root: int) -> dict[str, list[list[int]]]:
    """Each process of the tree rooted at ``root`` (host PIDs; stopped as criu dumped it) that
    has such memory, by its PID inside the tree's namespace: what a snapshot's
    ``meta.wipe_on_fork`` holds (docs/format.md §8)."""
    out: dict[str, list[list[int]]] = {}
    for pid in procs.tree(root):
        inner = procs.ns_pid(pid)
        try:
            found = ranges(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # (a zombie, or gone: no memory dumped either)
        except (OSError, ValueError, IndexError) as exc:
            raise RunError(f"cannot read which memory of pid {pid} a fork wipes: {exc}") from exc
        if found and inner is not None:
            out[str(inner)] = found
    return out


def record(wanted: dict[int, tuple[tuple[int, int], ...]]) -> str:
    """``wanted`` as the restored program reads it (the snapshot helper marks its own ranges
    wipe-on-fork again): JSON, {"PID": [[start, end], ...]}."""
    return json.dumps({str(pid): [list(r) for r in spans] for pid, spans in wanted.items()})


def wipe(root: int, wanted: dict[int, tuple[tuple[int, int], ...]]) -> int:
    """Zero ``wanted`` (lazyfs.format.snapshot.wipe_on_fork) in the restored tree rooted at
    ``root``; the bytes zeroed. Only pages with content are written: a page a lazy restore has
    yet to place is the page server's, which places a zero page there (lazypages.Handler's
    ``wiped``), and a write through /proc/PID/mem could not wait for it anyway (EIO)."""
    done = 0
    for pid in procs.tree(root) if wanted else ():
        spans = wanted.get(procs.ns_pid(pid))
        if not spans:
            continue
        try:
            with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap, \
                    open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
                for start, end in spans:
                    for at, n in _with_content(pagemap, start, end):
                        for off in range(0, n, len(_ZEROS)):
                            part = min(len(_ZEROS), n - off)
                            wrote = os.pwrite(mem.fileno(), memoryview(_ZEROS)[:part], at + off)
                            if wrote == 0:
                                raise ProcessLookupError  # (its memory is gone: it is exiting)
                            if wrote != part:
                                raise OSError(f"short write at {at + off:#x}")
                        done += n
        except (FileNotFoundError, ProcessLookupError):
            continue  # (gone, memory and all: nothing of it can run on the snapshot's state)
        except OSError as exc:
            raise RunError(f"cannot zero the wipe-on-fork memory of restored pid {pid}: {exc}") from exc
    return done


def _with_content(pagemap, start: int, end: int):
    """(address, bytes) runs of [start, end) whose pages are in memory or swapped out
    (/proc/PID/pagemap bits 63 and 62)."""
    first, count = start // PAGE, (end - start) // PAGE
    raw = b""
    while len(raw) < 8 * count:
        part = os.pread(pagemap.fileno(), 8 * count - len(raw), 8 * first + len(raw))
        if not part:
            raise OSError(f"pagemap ends before {end:#x}")
        raw += part
    entries = array.array("Q", raw)
    run = None
    for i, entry in enumerate(entries):
        if entry >> 62:
            run = run if run is not None else i
        elif run is not None:
            yield start + run * PAGE, (i - run) * PAGE
            run = None
    if run is not None:
        yield start + run * PAGE, (len(entries) - run) * PAGE

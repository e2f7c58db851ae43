"""Which process a pid names, and whether it still runs: /proc/PID/stat read once, in one
place. A pid alone may name another process later, so a process is named for good by its pid
and its start time (process_id), as the node's owner files and mount states record it.
"""
from __future__ import annotations

import os
import time


def proc_stat(pid: int) -> tuple[bytes, bytes, int] | None:
    """(name, state, start time in clock ticks after boot) of the process, from /proc/PID/stat
    (the name is whatever it set, parentheses included: hence the last ")"); None if there is
    no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            head, _, rest = f.read().rpartition(b")")
    except OSError:
        return None
    fields = rest.split()
    if len(fields) <= 19:
        return None
    return head.partition(b"(")[2], fields[0], int(fields[19])


def proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot, or None if there is no such process
    (or it is a zombie: it holds nothing any more)."""
    stat = proc_stat(pid)
    return None if stat is None or stat[1] == b"Z" else stat[2]


def process_id(pid: int | None = None) -> dict:
    """This process (or ``pid``) for good: a pid alone may name another process later."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "start": proc_start(pid)}


def is_running(ident: dict) -> bool:
    """Whether the process ``ident`` (process_id) still runs; False for a malformed one."""
    try:
        return proc_start(int(ident["pid"])) == ident["start"]
    except (KeyError, TypeError, ValueError):
        return False


def exited(pid: int) -> bool:
    """Gone, or a zombie: a detached process's parent is init, which may reap it only seconds
    later, and a zombie holds nothing (its mounts and descriptors are released)."""
    stat = proc_stat(pid)
    if stat is not None:
        return stat[1] == b"Z"
    try:  # (no stat to be read: gone, or a process whose stat did not parse)
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pid: int, timeout: float) -> bool:
    """Whether ``pid`` exited within ``timeout`` seconds; reaped, when it is our child (a
    zombie of ours would still "exist")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        if exited(pid):
            return True
        time.sleep(0.02)
    return False

"""Walking a process tree through /proc (host PIDs, and each process's PID inside its namespace)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

from lazyfs.proc import ident


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return out


def in_other_ns(parent: int) -> list[int]:
    """Children of ``parent`` in a PID namespace other than its own: the roots of trees that
    criu restore made (as siblings of itself), each its namespace's init."""
    try:
        own = os.readlink(f"/proc/{parent}/ns/pid")
    except OSError:
        return []
    out = []
    for pid in children(parent):
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") != own:
                out.append(pid)
        except OSError:
            pass  # gone
    return out


def kill_made(parent: int, wait: float = 30.0) -> None:
    """SIGKILL the trees criu restore made under ``parent`` (in_other_ns): each root is its
    namespace's init, so its whole tree goes with it. Then wait until they are gone (reaped,
    when they are the caller's children), ``wait`` seconds at most each."""
    roots = in_other_ns(parent)
    for pid in roots:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in roots:
        ident.wait_gone(pid, wait)


def resume(root: int, stopped: set[int] = frozenset()) -> None:
    """SIGCONT every process of the tree rooted at ``root`` (criu restore --leave-stopped left
    each stopped) but those whose pid in the tree's namespace is in ``stopped``: a signal had
    stopped them when the tree was dumped, and they stay so."""
    for pid in tree(root):
        if stopped and ns_pid(pid) in stopped:
            continue
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def tree(root: int) -> list[int]:
    """``root`` and all its descendants, parents first."""
    order, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        order.append(pid)
        todo += children(pid)
    return order


def ns_pid(pid: int) -> int | None:
    """The PID a process has inside its innermost PID namespace."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        return None
    return None

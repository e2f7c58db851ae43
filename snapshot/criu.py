"""Driving the criu binary: find a working one, dump a process tree, restore it.

CRIU runs as a separate process (it needs root and ptrace), with its log kept beside the images so
a failure can quote the lines that say why. scripts/install-criu provides a criu that passes
`criu check` on kernels the distribution's one does not know.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from lazyfs import paths
from lazyfs.errors import LazyfsError
from lazyfs.fsutil import atomic_write
from snapshot import criuimg

CANDIDATES = ("/usr/local/sbin/criu", "/usr/sbin/criu")


class CriuError(LazyfsError):
    """CRIU is missing, does not work on this kernel, or failed to dump or restore."""


def find() -> str:
    """Path of a criu that passes `criu check`, or CriuError saying why there is none. The
    answer is kept (``checked.json`` in the state directory) for as long as neither the binary
    nor the running kernel changes: `criu check` takes 40-70 ms, and a restore waits for it."""
    seen = []
    for path in (*CANDIDATES, shutil.which("criu")):
        if not path or path in seen or not os.access(path, os.X_OK):
            continue
        seen.append(path)
        if _passed(path):
            return path
        try:
            proc = subprocess.run([path, "check"], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            continue  # (a criu that hangs on this kernel is one that does not work here)
        if proc.returncode == 0:
            _remember(path)
            return path
    if not seen:
        raise CriuError("criu is not installed (run scripts/install-criu as root)")
    raise CriuError(f"criu at {', '.join(seen)} fails `criu check` on this kernel; "
                    "scripts/install-criu builds one that works")


def _identity(path: str) -> dict:
    st = os.stat(path)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
            "kernel": os.uname().release}


def _checked_file() -> Path:
    return paths.state_dir() / "criu" / "checked.json"


def _passed(path: str) -> bool:
    """Whether this very binary passed `criu check` on this very kernel before."""
    try:
        return json.loads(_checked_file().read_text()) == _identity(path)
    except (OSError, ValueError):
        return False


def _remember(path: str) -> None:
    try:
        f = _checked_file()
        f.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(f, json.dumps(_identity(path)).encode(), f.parent, durable=False)
    except OSError:
        pass  # only a cache: the next restore checks again


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "CRIU needs root"
    try:
        find()
    except CriuError as exc:
        return str(exc)
    return None


def _tail(log: Path, n: int = 8) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errors = [l for l in lines if "Error" in l and "RLIMIT_NOFILE" not in l]
    return "\n  ".join((errors or lines)[-n:])


# Both ways: file locks, files deleted while open. A tree with a network of its own (--network
# none) comes back in a new empty one, its loopback down as a new run's is: restoring the dumped
# one's addresses, routes and iptables runs ip and iptables-restore, some 55 ms of every restore.
# Nor is that network locked (iptables-restore again, on the dump and the restore, and a node
# without iptables could take no snapshot): with its loopback down it has no traffic to hold.
# (A tree on the host's network is in criu's own namespace, which is neither dumped nor locked.)
COMMON = ("-v4", "--file-locks", "--link-remap", "--empty-ns", "net", "--network-lock", "skip")


def dump(criu: str, pid: int, images: Path) -> None:
    """Dump the tree rooted at ``pid`` (the init of its own PID namespace) into ``images``,
    leaving it stopped as dumped, for the caller to read what CRIU's images do not say (its
    memory a fork wipes, snapshot.wipe) and then kill."""
    images.mkdir(parents=True, exist_ok=True)
    cmd = [criu, "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", *COMMON, "--leave-stopped"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CriuError(f"criu dump of pid {pid} failed:\n  {_tail(images / 'dump.log')}")


def restore_command(criu: str, images: Path, pidfile: Path, log: Path, lazy: bool = False) -> list[str]:
    """The restored root task becomes a sibling of criu (so a child of whoever started criu),
    in a new PID namespace of its own, and criu exits once it runs. ``lazy``: private anonymous
    memory is left to the page server listening in ``images`` (snapshot.lazyserver). Every task
    stays stopped (SIGSTOP) until the caller continues it (restore.criu_restore)."""
    return [criu, "restore", "-D", str(images), "-o", str(log), *COMMON, "--restore-detached",
            "--restore-sibling", "--pidfile", str(pidfile), *(["--lazy-pages"] if lazy else []),
            "--leave-stopped"]


def stopped_at_dump(images: Path) -> set[int]:
    """The tasks (by their pid in the tree's PID namespace) a signal had stopped when the tree
    was dumped: a restore, which continues its tree itself, leaves them be."""
    pids = criuimg.pstree_pids((images / "pstree.img").read_bytes())
    return {pid for pid in pids
            if criuimg.task_state((images / f"core-{pid}.img").read_bytes()) == criuimg.TASK_STOPPED}

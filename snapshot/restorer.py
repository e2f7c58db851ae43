"""Where `criu restore` runs: a fresh private mount namespace in which the restore's workspace
is bound over the path the snapshot was taken at, with /proc and a minimal /dev in the
container root. Internal to `lazyfs run --restore`.

A restore that is single-threaded when it gets here forks and enters that namespace itself
(``start``: no interpreter starts, 50-100 ms on a cold page cache); otherwise this module is
run under `unshare --mount --propagation private` and does the same (``main``).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from lazyfs.proc import spawn, syscalls as sc
from lazyfs.runner.nsinit import setup
from snapshot import guard


def enter(workspace: str, at: str, criu_argv: list[str], parent: int, guarded: bool) -> NoReturn:
    """In the new mount namespace: bind the workspace at ``at``, set up the root, exec criu.
    ``guarded``: criu dies with ``parent``, the restore that started it, and leaves a guard for
    the tree it makes (snapshot.guard). A lazy restore's page server is its guard instead: it
    kills criu itself, once it has seen to the tasks that reached it."""
    if guarded:  # (guard.start checks that ``parent`` had not gone before this)
        sc.die_with_parent(signal.SIGKILL)
    os.makedirs(at, exist_ok=True)
    sc.mount(workspace, at, None, sc.MS_BIND | sc.MS_REC, None)
    setup(os.path.join(at, "rootfs"), hostname=None)  # the UTS namespace comes from the dump
    sys.stdout.flush()
    if guarded:
        guard.start(parent, criu_argv)  # (the tree criu makes, should the restore die meanwhile)
    os.execv(criu_argv[0], criu_argv)


def start(workspace: Path, at: str, criu_argv: list[str], output: Path, *,
          guarded: bool) -> tuple[int, str]:
    """Run criu restore in its namespace; (exit status, what it printed). Forks when this
    process is single-threaded, else starts an interpreter under `unshare`."""
    parent = os.getpid()
    if not spawn.single_threaded():
        cmd = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
               "snapshot.restorer", "--workspace", str(workspace), "--at", at, "--parent", str(parent),
               *(["--guarded"] if guarded else []), "--", *criu_argv]
        res = subprocess.run(cmd, capture_output=True, text=True)
        return res.returncode, res.stderr
    pid = 0
    try:
        with open(output, "wb") as out, spawn.holding_sigint() as held:
            pid = os.fork()
            if pid == 0:
                def child() -> int:
                    signal.pthread_sigmask(signal.SIG_SETMASK, held)  # criu's own, as it was
                    os.dup2(out.fileno(), 1)
                    os.dup2(out.fileno(), 2)
                    sc.unshare(sc.CLONE_NEWNS)
                    sc.make_mounts_private()
                    enter(str(workspace), at, criu_argv, parent, guarded)
                spawn.child(child)
        _, status = os.waitpid(pid, 0)
    except BaseException:  # Ctrl-C (also one held back across the fork): no criu left on its own
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        raise
    code = os.waitstatus_to_exitcode(status)
    return code, output.read_text(errors="replace")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workspace", required=True)
    p.add_argument("--at", required=True, help="the snapshot's mount path")
    p.add_argument("--parent", type=int, required=True, help="the restore's pid: criu dies with it")
    p.add_argument("--guarded", action="store_true", help="leave a guard for the tree criu makes")
    p.add_argument("criu", nargs="+")
    a = p.parse_args()
    enter(a.workspace, a.at, a.criu, a.parent, a.guarded)


if __name__ == "__main__":
    main()

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


def enter(workspace: str, at: str, criu_argv: list[str]) -> NoReturn:
    """In the new mount namespace: bind the workspace at ``at``, set up the root, exec criu."""
    os.makedirs(at, exist_ok=True)
    sc.mount(workspace, at, None, sc.MS_BIND | sc.MS_REC, None)
    setup(os.path.join(at, "rootfs"), hostname=None)  # the UTS namespace comes from the dump
    sys.stdout.flush()
    os.execv(criu_argv[0], criu_argv)


def start(workspace: Path, at: str, criu_argv: list[str], output: Path) -> tuple[int, str]:
    """Run criu restore in its namespace; (exit status, what it printed). Forks when this
    process is single-threaded, else starts an interpreter under `unshare`."""
    if not spawn.single_threaded():
        cmd = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
               "snapshot.restorer", "--workspace", str(workspace), "--at", at, "--", *criu_argv]
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
                    enter(str(workspace), at, criu_argv)
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
    p.add_argument("criu", nargs="+")
    a = p.parse_args()
    enter(a.workspace, a.at, a.criu)


if __name__ == "__main__":
    main()

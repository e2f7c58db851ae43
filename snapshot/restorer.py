"""Where `criu restore` runs: a fresh private mount namespace in which the restore's workspace
is bound over the path the snapshot was taken at, with /proc and a minimal /dev in the
container root. Internal to `lazyfs run --restore`.

criu makes the tree's PID namespace only as it restores, after that /proc was mounted (by a
process of the host's, so it shows the host's processes). Once criu is done, and before any task
of the tree runs on, ``own_proc`` puts a /proc of the tree's own namespace in its place, as the
snapshot run had it.

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

from lazyfs.errors import RunError
from lazyfs.proc import spawn, syscalls as sc
from lazyfs.runner.nsinit import setup
from snapshot import guard, layer


def enter(workspace: str, at: str, criu_argv: list[str], parent: int, guarded: bool,
          shm: str | None = None) -> NoReturn:
    """In the new mount namespace: bind the workspace at ``at``, set up the root, exec criu.
    ``guarded``: criu dies with ``parent``, the restore that started it, and leaves a guard for
    the tree it makes (snapshot.guard). A lazy restore's page server is its guard instead: it
    kills criu itself, once it has seen to the tasks that reached it. ``shm``: what the
    container's /dev/shm held (snapshot.layer), unpacked into the new one."""
    if guarded:  # (guard.start checks that ``parent`` had not gone before this)
        sc.die_with_parent(signal.SIGKILL)
    os.makedirs(at, exist_ok=True)
    sc.mount(workspace, at, None, sc.MS_BIND | sc.MS_REC, None)
    setup(os.path.join(at, "rootfs"), hostname=None)  # the UTS namespace comes from the dump
    if shm:
        layer.unpack_shm(Path(shm), Path(at, "rootfs", "dev", "shm"))
    sys.stdout.flush()
    if guarded:
        guard.start(parent, criu_argv)  # (the tree criu makes, should the restore die meanwhile)
    os.execv(criu_argv[0], criu_argv)


def start(workspace: Path, at: str, criu_argv: list[str], output: Path, *,
          guarded: bool, shm: Path | None = None) -> tuple[int, str]:
    """Run criu restore in its namespace; (exit status, what it printed). Forks when this
    process is single-threaded, else starts an interpreter under `unshare`."""
    parent = os.getpid()
    if not spawn.single_threaded():
        cmd = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
               "snapshot.restorer", "--workspace", str(workspace), "--at", at, "--parent", str(parent),
               *(["--guarded"] if guarded else []), *(["--shm", str(shm)] if shm else []),
               "--", *criu_argv]
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
                    enter(str(workspace), at, criu_argv, parent, guarded, str(shm) if shm else None)
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


KILLED = 255  # own_proc's child: the one that mounts was killed (errno values stay below it)


def own_proc(root: int, at: str) -> None:
    """Replace the /proc in the root of the tree rooted at ``root`` (its workspace bound at
    ``at``) with one of the tree's PID namespace. A procfs shows the namespace of the process
    that mounts it: a child of this process's joins the tree's mount namespace (criu's, where
    the tree lives) and PID namespace, and a child of its own, a member of the tree's namespace
    for that moment, mounts it. Call it while the tree is stopped; should it fail, the tree is
    to be killed (and the namespace, with anything of this left in it, goes with its init)."""
    target = os.path.join(at, "rootfs", "proc")
    fds: list[int] = []
    pid = 0
    try:
        for kind in ("mnt", "pid"):
            try:
                fds.append(os.open(f"/proc/{root}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                raise RunError(f"cannot mount the restored tree's own /proc: {exc.strerror}") from None
        with spawn.holding_sigint():  # (a Ctrl-C comes after the fork, to the parent alone)
            pid = os.fork()
            if pid == 0:
                _own_proc_child(fds, target)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        pid = 0
    except BaseException:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    finally:
        for fd in fds:
            os.close(fd)
    if code != 0:
        why = "killed" if code < 0 or code == KILLED else os.strerror(code)
        raise RunError(f"cannot mount the restored tree's own /proc: {why}")


def _own_proc_child(fds: list[int], target: str) -> NoReturn:
    """Its exit code is the errno that stopped it. No locks and no output: the restore may have
    other threads, whose locks a fork copies held."""
    code = 1
    try:
        sc.setns(fds[0], sc.CLONE_NEWNS)
        sc.setns(fds[1], sc.CLONE_NEWPID)  # (for the children made from now on)
        inner = os.fork()
        if inner == 0:
            try:
                sc.umount(target, sc.MNT_DETACH)
                sc.mount("proc", target, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
                code = 0
            except OSError as exc:
                code = exc.errno or 1
            finally:
                os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(inner, 0)[1])
        code = code if code >= 0 else KILLED
    except OSError as exc:
        code = exc.errno or 1
    finally:
        os._exit(code)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workspace", required=True)
    p.add_argument("--at", required=True, help="the snapshot's mount path")
    p.add_argument("--parent", type=int, required=True, help="the restore's pid: criu dies with it")
    p.add_argument("--guarded", action="store_true", help="leave a guard for the tree criu makes")
    p.add_argument("--shm", help="what the container's /dev/shm held (a tar), for the new one")
    p.add_argument("criu", nargs="+")
    a = p.parse_args()
    enter(a.workspace, a.at, a.criu, a.parent, a.guarded, a.shm)


if __name__ == "__main__":
    main()

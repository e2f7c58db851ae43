"""The namespaces runtime without starting programs: `unshare --mount --pid --fork --kill-child
--uts --ipc [--net] --propagation private` and nsinit, done by forks of the caller.

`unshare` and a fresh interpreter for nsinit cost about 25 ms of every container start (measured
in docs/node.md); a fork of a process that has lazyfs imported costs about one. It is the same
sequence: the first fork unshares the namespaces, makes every mount private, and waits for the
second, which is PID 1 of the new PID namespace, dies with its parent (PR_SET_PDEATHSIG, as
--kill-child), and runs nsinit.enter (mounts, chroot, user, exec). The waiting process ignores
SIGINT and SIGTERM and passes the container's exit status on, a death by signal as that signal,
as unshare does, so lazyfs.runner.session supervises it exactly like the unshare command. Unlike
unshare, it also dies with the `lazyfs run` that forked it (PR_SET_PDEATHSIG), and so the
container with it: a run killed with SIGKILL cannot stop its container, and one left running,
that nobody supervises, would keep the image's shared mount busy after its lease was dropped.
Only for single-threaded callers (runtime.start checks): a fork copies no other thread.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from lazyfs.proc import syscalls as sc
from lazyfs.proc.spawn import Forked, child, holding_sigint
from lazyfs.runner import nsinit
from lazyfs.runner import runtime as rt


def start(rootfs: Path, spec, started: list) -> None:
    """Fork the container; its handle goes into ``started`` before a Ctrl-C can interrupt (SIGINT
    is held back across the fork, and delivered once the handle is recorded)."""
    args = nsinit.Args(nsinit.command_line(rootfs, spec))
    flags = sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC
    if rt.own_network(spec):
        flags |= sc.CLONE_NEWNET
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    with holding_sigint():
        pid = os.fork()
        if pid == 0:
            _waiter(flags, args, parent)
        started.append(Forked(pid, ["(namespaces)", *args.argv]))


def _waiter(flags: int, args: nsinit.Args, parent: int) -> None:
    """The first fork: `unshare --fork --kill-child`, dying with ``parent``. Never returns."""
    def wait_for_container() -> int:
        sc.die_with_parent(signal.SIGKILL)
        if os.getppid() != parent:  # it died before the line above: nobody is left to wait for us
            return 128 + signal.SIGKILL
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # as unshare does while it waits
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        # start() held SIGINT back across the fork; the container must get it again.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        sc.unshare(flags)
        sc.make_mounts_private()
        pid = os.fork()
        if pid == 0:
            child(lambda: _init(args), failed=127)
        _, status = os.waitpid(pid, 0)  # retried across signals by Python itself (PEP 475)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)  # die as the container died
        return os.waitstatus_to_exitcode(status)
    child(wait_for_container, failed=127)


def _init(args: nsinit.Args) -> None:
    """The second fork: PID 1 of the container; nsinit.enter execs or exits."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    sc.die_with_parent(signal.SIGKILL)  # as unshare --kill-child
    maxfd = os.sysconf("SC_OPEN_MAX")
    os.closerange(3, maxfd if maxfd > 0 else 65536)
    nsinit.enter(args)

"""The guard of a tree that `criu restore` is making: whoever started the restore can be killed
(SIGKILL, the OOM killer) while criu makes it, and then no one would end what it made. criu
itself dies with it (a parent-death signal: snapshot.restorer); a half-made tree does not. Its
root is criu's sibling, the restore's child (``--restore-sibling``): it is reparented when the
restore dies, and waits on criu's next stage for ever, or, were criu done, polls for the marker
no one will write. It gets the restore's parent-death signal (CRIU restores the snapshot
run's) only at the end of criu's work.

The guard is a process of its own (a double fork of criu's process before it execs criu, so
that criu never sees a child of its own exit, which it would take for a failed restore). Until
criu exits it keeps a pidfd on every tree root among the restore's children; if the restore
goes first, it SIGKILLs those roots (each is its PID namespace's init, so its tree goes with
it) and every process still in criu's mount namespace. That namespace is the restore's own
(made for criu alone, snapshot.restorer) and criu clones the tree's tasks into it, so this
finds a root cloned just before the restore died, between two looks, whatever it runs as by
then. (A task still carrying criu's command line, which names the restore's own workspace, is
killed too, should the namespace ever not be criu's alone.) Once criu has exited, the tree's
root has the parent-death signal, or the restore kills what criu left (restore.criu_restore).

A lazy restore needs none: its page server watches the restore the same way, and a task that
cannot hand its memory to a page server that has gone fails criu's restore, which then kills
the tree (snapshot.lazyserver).
"""
from __future__ import annotations

import os
import select
import signal

from lazyfs.proc import spawn
from snapshot import procs

LOOK_EVERY = 0.005  # seconds between two looks for a new root: criu makes a root within moments
# Seconds the restore has to be seen alive once criu has exited: criu dies with the thread that
# started it, and a restore of several threads is seen gone only once the last has exited.
GRACE = 1.0
NAME = "lazyfs-guard"


def start(restore: int, argv: list[str]) -> None:
    """From criu's process, just before it execs ``argv``: leave a guard behind, detached (its
    parent exits at once, reaped here), watching ``restore`` and this process. Both are held
    by pidfds taken here, before any fork: a guard that runs late never mistakes a criu done
    (or a pid taken by another process since) for anything else."""
    criu_fd = os.pidfd_open(os.getpid())
    made_in = _made_in(restore)
    try:
        restore_fd = os.pidfd_open(restore)
    except ProcessLookupError:
        restore_fd = None
    if restore_fd is None or os.getppid() != restore:  # (gone already: criu dies with it)
        os._exit(128 + signal.SIGKILL)
    first = os.fork()
    if first == 0:
        def middle() -> int:
            if os.fork() == 0:
                spawn.child(lambda: _guard(restore, restore_fd, criu_fd, argv, made_in))
            return 0
        spawn.child(middle)
    os.waitpid(first, 0)
    for fd in (criu_fd, restore_fd, made_in):
        if fd is not None:
            os.close(fd)


def _made_in(restore: int) -> int | None:
    """A descriptor of the mount namespace criu makes the tree in (this process's), when it is
    not the restore's own: only then is everything in it criu's (snapshot.restorer made it for
    criu). Held, the namespace cannot be freed and its inode number given to another one while
    the guard compares against it. None where that cannot be told."""
    try:
        fd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        here, theirs = os.fstat(fd), os.stat(f"/proc/{restore}/ns/mnt")
        if (here.st_dev, here.st_ino) != (theirs.st_dev, theirs.st_ino):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _guard(restore: int, restore_fd: int, criu_fd: int, argv: list[str], made_in: int | None) -> int:
    import gc
    from lazyfs.proc import syscalls
    # An object of the restore's, collected later, would close a descriptor it no longer owns:
    # by number, perhaps one of the pidfds.
    gc.disable()
    os.setsid()  # (no terminal's Ctrl-C: the restore is the one to stop)
    # Out of criu's mount namespace, into the restore's: held here, that namespace would hold the
    # workspace's mounts (and the image's) for as long as the guard lives, past the restore's own
    # teardown. It reads /proc only.
    try:
        ns = os.open(f"/proc/{restore}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.setns(ns, syscalls.CLONE_NEWNS)
        finally:
            os.close(ns)
        os.chdir("/")
    except OSError:
        pass  # (the restore gone already: the pidfd says so below)
    syscalls.set_name(NAME)  # (once out of criu's namespace: the tests look for it by this name)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    keep = {0, 1, 2, restore_fd, criu_fd, made_in}
    for name in os.listdir("/proc/self/fd"):  # (a pipe of the restore's, held here, would hold its reader)
        if int(name) not in keep:
            try:
                os.close(int(name))
            except OSError:
                pass  # (the directory's own descriptor, closed by now)
    roots: dict[int, int] = {}
    poll = select.poll()
    poll.register(restore_fd, select.POLLIN)
    poll.register(criu_fd, select.POLLIN)
    while True:
        # criu makes one tree: once its root is known, only the two processes' ends are waited on
        events = dict(poll.poll(None if roots else int(LOOK_EVERY * 1000)))
        if any(ev & select.POLLNVAL for ev in events.values()):
            return 1  # (not a process's end: nothing is killed on it)
        if restore_fd in events or (criu_fd in events and spawn.readable(restore_fd, GRACE)):
            return _end(roots, argv, made_in)
        if criu_fd in events:
            return 0  # criu is done (or failed): the restore, alive, takes it from here
        roots = _roots(restore, roots)


def _roots(restore: int, known: dict[int, int]) -> dict[int, int]:
    """``known``, and a pidfd on each tree root now among ``restore``'s children."""
    for pid in procs.in_other_ns(restore):
        if pid in known:
            continue
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        if pid in procs.in_other_ns(restore):  # (still the restore's child: the pidfd is the root's)
            known[pid] = fd
        else:
            os.close(fd)
    return known


def _end(roots: dict[int, int], argv: list[str], made_in: int | None) -> int:
    """The restore is gone: kill the roots known, and every other process still in criu's mount
    namespace (``made_in``, a descriptor of it) or running as this criu (by its command line,
    which holds the restore's own workspace path)."""
    for fd in roots.values():
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cmdline = "\0".join(argv).encode() + b"\0"
    mine = os.getpid()
    criu_ns = None
    if made_in is not None:
        st = os.fstat(made_in)
        criu_ns = (st.st_dev, st.st_ino)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == mine:
            continue
        try:  # (a pidfd first: a pid reused between the look and the kill is not killed)
            fd = os.pidfd_open(int(pid))
        except OSError:
            continue
        try:
            st = os.stat(f"/proc/{pid}/ns/mnt") if criu_ns is not None else None
            if st is None or (st.st_dev, st.st_ino) != criu_ns:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read() != cmdline:
                        continue
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os.close(fd)
    return 0

"""Starting `lazyfs run` from the node: fork, become the client's process, run the CLI.

The node's fork server (lazyfs.node.forker) has lazyfs (the CLI, the run path, the mount code)
imported already, so a fork of it is a `lazyfs run` with no interpreter start and no imports.
The forked worker takes the client's stdio descriptors, working directory and environment, runs
the ordinary CLI code on the client's command line, and writes its pid, then at the end its exit
status, to the client's connection. It is not a child of the client, so the terminal's Ctrl-C
reaches only the client. The worker leads a process group of its own (its runtime and container
are in it), and the client sends a SIGINT to that whole group, as a terminal sends it to its
foreground group; other signals go to the worker, which handles them as `lazyfs run` always has.
A client killed with SIGKILL forwards nothing, so the worker watches its connection too: when the
client is gone, it sends itself SIGTERM, as a `kill` of `lazyfs run` would (the container stopped,
everything torn down). A worker thread would cost the run its fork-based runtime (a fork copies
no other thread), so the watch is signal-driven I/O on the connection (O_ASYNC: SIGIO).
"""
from __future__ import annotations

import fcntl
import gc
import logging
import os
import signal
import socket
import sys

from lazyfs.proc import spawn, syscalls

PRELOAD = ("lazyfs.cli", "lazyfs.cli.run", "lazyfs.runner.session", "lazyfs.runner.nsinit",
           "lazyfs.node.client", "lazyfs.fs.control",
           # A mount daemon is a fork of the same server: what it imports (fusepy, urllib3, the
           # fleet, the node cache) cost about 100 ms of every cold mount when imported after it.
           "fuse", "urllib3", "lazyfs.fs.daemon", "lazyfs.fs.fuseops", "lazyfs.fs.dataindex",
           "lazyfs.fs.index", "lazyfs.fs.autoprofile", "lazyfs.cache.nodecache",
           "lazyfs.cache.prefetcher", "lazyfs.cache.completer", "lazyfs.source.fleet",
           "lazyfs.source.reader", "lazyfs.records.metadata", "lazyfs.records.profiles",
           "lazyfs.format.erofs", "lazyfs.store.http",
           # A daemon's first request encodes the server's host name (urllib3): on a cold page
           # cache these three imports read from disk in the middle of the mount.
           "encodings.idna")


def preload() -> None:
    """Import what a run needs, once, in the agent (so that forks of it start warm)."""
    import importlib
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except (ImportError, OSError):  # fusepy without libfuse, say: the fork imports (and fails) itself
            pass
    import typer.main

    import lazyfs.cli
    lazyfs.cli._register(["lazyfs", "run"])
    lazyfs.cli.prebuilt = typer.main.get_command(lazyfs.cli.app)
    for name in lazyfs.cli.deferred_imports():
        try:
            importlib.import_module(name)
        except (ImportError, OSError):  # (the run that needs it imports, and fails, itself)
            pass


def start(conn_fd: int, fds: list[int], req: dict) -> int:
    """Fork the worker for the client on ``conn_fd`` with its stdio ``fds``; returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    # The preloaded objects to the permanent generation: the worker's collections then never walk
    # them, which would touch (and so copy) every page of the parent's heap.
    gc.freeze()
    pid = os.fork()
    if pid:
        return pid
    conn = socket.socket(fileno=os.dup(conn_fd))
    # The pid first, from the worker itself: nothing it writes later can overtake it.
    spawn.child(lambda: _worker(conn, fds, req), last=lambda code: conn.sendall(b'{"exit": %d}\n' % code))


def _worker(conn: socket.socket, fds: list[int], req: dict) -> int:
    conn.sendall(b'{"ok": true, "pid": %d}\n' % os.getpid())
    syscalls.set_name("lazyfs-run")
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    os.setsid()  # out of the agent's process group: its signals are not the run's
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    keep = {0, 1, 2, conn.fileno()}
    for fd in os.listdir("/proc/self/fd"):
        if int(fd) not in keep:
            try:
                os.close(int(fd))
            except OSError:
                pass
    _stop_when_the_client_goes(conn)
    _as_the_client(req.get("client_pid"))
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in req["env"].items()})
    logging.root.handlers.clear()
    logging.getLogger("lazyfs.node").setLevel(logging.NOTSET)
    sys.argv = ["lazyfs", *[str(a) for a in req["argv"]]]
    from lazyfs.cli import main
    main()
    return 0


def _as_the_client(pid) -> None:
    """Take on the client's resource limits, which the run the client would have started itself
    inherits and the request does not carry. (The container's umask is docker's whatever the
    caller's, on either path: lazyfs.cli.run. Its cgroup is the agent's, as a container of
    docker's runs under its daemon's, not its client's.)"""
    if not isinstance(pid, int) or pid <= 0:
        return
    import resource
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            limit = getattr(resource, name)
            try:
                resource.setrlimit(limit, resource.prlimit(pid, limit))
            except (OSError, ValueError) as exc:  # (a client gone meanwhile: the watch above stops us)
                logging.getLogger("lazyfs.node").warning(
                    "a run cannot take on its client's (pid %d) %s: %s", pid, name, exc)


def _stop_when_the_client_goes(conn: socket.socket) -> None:
    """SIGTERM to this process once the client's end of ``conn`` closes (it sends nothing after
    its request, so the connection turns readable only then)."""
    def check(signum=None, frame=None) -> None:
        try:
            gone = conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            gone = False
        except OSError:
            gone = True
        if gone:
            signal.signal(signal.SIGIO, signal.SIG_IGN)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGIO, check)
    fcntl.fcntl(conn.fileno(), fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(conn.fileno(), fcntl.F_SETFL, fcntl.fcntl(conn.fileno(), fcntl.F_GETFL) | os.O_ASYNC)
    check()  # (gone before the watch was set: no signal would come)

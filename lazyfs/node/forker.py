"""The fork server: the one process on a node that forks `lazyfs run`s and mount daemons.

A fork is only safe in a process with a single thread (it copies no other thread, but every lock
those threads held). The agent cannot promise that: the stores and cache-server fleets it opens
run thread pools, and it serves requests on threads of its own so that one slow cold mount does
not hold up other clients. So the agent never forks a run. At start, while it still has one
thread and has lazyfs imported (lazyfs.node.zygote.preload), it forks this server, which never
starts a thread and never opens a store: every run and every mount daemon is a fork of it, warm,
for the whole life of the agent.

Protocol on a socketpair, lazyfs.node.wire lines, one request at a time:
- ``{"op": "run", "req": EXEC-REQUEST}`` with descriptors [client connection, stdin, stdout,
  stderr]: fork a run worker (lazyfs.node.zygote); the worker itself tells the client its pid.
- ``{"op": "spawn", "argv": [...], "fd": N, "log": PATH, "debug": B}`` with [readiness pipe]:
  fork a detached process that runs ``python -m MODULE ARGS`` as a call of MODULE.main(ARGS)
  (lazyfs.proc.spawn.fork_detached), the same command line the exec path would start; the pipe is
  given the number N the command line names, as the exec path's pass_fds would.
The answer is ``{"ok": true, "pid": N}`` with a pidfd for the child as its descriptor, so the
agent can watch a process it did not fork; or ``{"ok": false, "error": ...}``.

If this server dies, the agent starts another: by a fork while it is single-threaded, else as
``python -m lazyfs.node.forker --fd N`` (a fresh interpreter that imports what runs need first).
"""
from __future__ import annotations

import gc
import importlib
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading

from lazyfs.errors import NodeError
from lazyfs.proc import spawn, syscalls
from lazyfs.node import wire

log = logging.getLogger("lazyfs.node")
REAP_EVERY = 1.0  # seconds: exited children are collected at least this often
RUN_REAP_EVERY = 0.1  # seconds, while run workers live: one killed by a signal is told of soon
ANSWER_TIMEOUT = 10.0  # a fork answers in milliseconds; a server that does not is dead to us


class ForkServer:
    """The agent's handle on its fork server. Thread-safe: one request at a time."""

    def __init__(self, log_file: str | None = None):
        self.log_file = log_file
        self.sock: socket.socket | None = None
        self.reader: wire.LineReader | None = None
        self.pid = 0
        self.starts = 0
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start (or start again) the server: a fork if this process has one thread, else exec."""
        ours, theirs = socket.socketpair()
        if spawn.single_threaded():
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                ours.close()
                spawn.child(lambda: serve(theirs))
        else:
            out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
            try:
                pid = subprocess.Popen([sys.executable, "-m", "lazyfs.node.forker", "--fd",
                                        str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                       start_new_session=True).pid
            finally:
                if out is not subprocess.DEVNULL:
                    out.close()
        theirs.close()
        ours.settimeout(ANSWER_TIMEOUT)
        self.close()
        self.sock, self.reader, self.pid = ours, wire.LineReader(ours), pid
        self.starts += 1

    def close(self) -> None:
        """Stop the server (it exits when its socket closes) and collect it if it is our child."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.reap()

    def kill(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self.pid = 0
        self.close()

    def reap(self) -> None:
        """Collect the server if it exited (the agent's only child: what its threads start with
        subprocess they wait for themselves, and runs and daemons are the server's children)."""
        if self.pid:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                    self.pid = 0
            except ChildProcessError:
                pass

    def run(self, conn_fd: int, stdio: list[int], req: dict) -> int:
        """Fork a `lazyfs run` worker for the client on ``conn_fd``; its pid."""
        pid, pidfd = self._ask({"op": "run", "req": req}, [conn_fd, *stdio])
        os.close(pidfd)
        return pid

    def spawn(self, exec_args: list[str], log_file: str, keep_fd: int, debug: bool) -> spawn.Watched:
        """Fork a detached ``python -m MODULE ARGS`` (what spawn.start would exec)."""
        pid, pidfd = self._ask({"op": "spawn", "argv": exec_args[1:], "fd": keep_fd, "log": str(log_file),
                                "debug": debug}, [keep_fd])
        return spawn.Watched(pid, pidfd, exec_args)

    def _ask(self, msg: dict, fds: list[int]) -> tuple[int, int]:
        with self._lock:
            for attempt in (1, 2):  # a server found dead before it read the request: once more
                if self.sock is None:
                    self.start()
                try:
                    wire.send(self.sock, msg, fds)
                except OSError as exc:
                    log.warning("the fork server (pid %d) is gone (%s); starting another", self.pid, exc)
                    self.close()
                    continue
                try:
                    answer = self.reader.read_message()
                except OSError as exc:
                    answer, why = None, str(exc)
                else:
                    why = "it closed its socket"
                if answer is None:
                    # It may have forked already: never ask twice. A server that hangs is killed.
                    log.warning("the fork server (pid %d) did not answer (%s); starting another "
                                "for the next request", self.pid, why)
                    self.kill()
                    raise NodeError(f"the fork server did not answer ({why})")
                got = self.reader.fds
                self.reader.fds = []
                if not answer.get("ok") or len(got) != 1:
                    for fd in got:
                        os.close(fd)
                    raise NodeError(f"the fork server refused: {answer.get('error', answer)}")
                return int(answer["pid"]), got[0]
            raise NodeError("the fork server cannot be started")


# -- the server -----------------------------------------------------------------------------------
def serve(sock: socket.socket) -> int:
    """The server's loop, in its own process: until the agent closes the socket."""
    syscalls.set_name("lazyfs-forker")
    signal.set_wakeup_fd(-1)  # the agent's self-pipe; its number is reused below
    # Whatever the thread that started us had blocked (mounts hold SIGINT back while they fork)
    # must not be inherited by every run forked from here.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the agent to handle
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    if os.getsid(0) != os.getpid():  # (the exec path starts it in a session of its own)
        os.setsid()  # out of the agent's group: signals to it are not ours
    # Finalize the agent's garbage while its descriptors are its own, then keep only stdio and
    # our socket: an inherited listener would keep the agent's socket connectable after it died.
    gc.collect()
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, max(os.sysconf("SC_OPEN_MAX"), keep + 2))
    gc.freeze()  # the preloaded heap is shared with every fork; collections must not touch it
    # One descriptor for each live run (_runs): a unit's default soft limit of 1024 would refuse
    # runs long before the node has as many. (Forks put it back as it was: zygote._as_the_client.)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sock.settimeout(None)
    reader = wire.LineReader(sock)
    while True:
        every = RUN_REAP_EVERY if _runs else REAP_EVERY
        if b"\n" not in reader.buf and not select.select([sock], [], [], every)[0]:
            _reap()
            continue
        try:
            msg = reader.read_message()
        except NodeError as exc:
            wire.send(sock, {"ok": False, "error": str(exc)})
            continue
        if msg is None:
            return 0
        fds, reader.fds = reader.fds, []
        try:
            pid = _fork(msg, fds)
            pidfd = os.pidfd_open(pid)  # before any reap: the pid is still this child's
        except Exception as exc:  # a bad request is answered, never the server's end
            wire.send(sock, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        else:
            wire.send(sock, {"ok": True, "pid": pid}, [pidfd])
            os.close(pidfd)
        finally:
            for fd in fds:
                os.close(fd)
        _reap()


def _fork(msg: dict, fds: list[int]) -> int:
    op = msg.get("op")
    if op == "run" and len(fds) == 4 and isinstance(msg.get("req"), dict):
        from lazyfs.node import zygote
        conn = os.dup(fds[0])  # (before the fork: out of descriptors, the run is refused whole)
        try:
            pid = zygote.start(fds[0], fds[1:], msg["req"])
        except BaseException:
            os.close(conn)
            raise
        _runs[pid] = conn
        return pid
    want = msg.get("fd")
    if op == "spawn" and len(fds) == 1 and _module_argv(msg.get("argv")) and isinstance(want, int) and want > 2:
        module, args = _module_argv(msg["argv"])
        main = importlib.import_module(module).main

        def run() -> int:
            if fds[0] != want:  # only stdio and this pipe are open here: ``want`` is free
                os.dup2(fds[0], want)
                os.close(fds[0])
            return main(args)
        return spawn.fork_detached(run, msg["log"], fds[0], bool(msg.get("debug")))
    raise NodeError(f"malformed fork request {str(msg)[:200]!r} with {len(fds)} descriptor(s)")


def _module_argv(argv) -> tuple[str, list[str]] | None:
    """``["-m", MODULE, *ARGS]`` → (MODULE, ARGS); None for anything else."""
    if isinstance(argv, list) and len(argv) >= 2 and argv[0] == "-m" and \
            all(isinstance(a, str) for a in argv):
        return argv[1], argv[2:]
    return None


# Each run worker's client connection, by the worker's pid. A worker writes its own exit status
# there as it ends; one killed by a signal cannot, and the client would learn nothing of how.
_runs: dict[int, int] = {}


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = _runs.pop(pid, None)
        if conn is not None:
            if os.WIFSIGNALED(status):  # as the shell reports it, and a plain `lazyfs run` exits
                _tell(conn, b'{"exit": %d}\n' % (128 + os.WTERMSIG(status)))
            os.close(conn)


def _tell(conn: int, line: bytes) -> None:
    with socket.socket(fileno=os.dup(conn)) as s:
        try:  # (never blocks the server: a client that reads nothing loses the line)
            s.send(line, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    """``python -m lazyfs.node.forker --fd N``: the server started by exec."""
    import argparse
    p = argparse.ArgumentParser(prog="lazyfs-forker", description="internal: the node's fork server")
    p.add_argument("--fd", type=int, required=True)
    args = p.parse_args(argv)
    from lazyfs.node import zygote
    zygote.preload()
    return serve(socket.socket(fileno=args.fd))


if __name__ == "__main__":
    sys.exit(main())

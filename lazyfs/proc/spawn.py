"""Starting the mount daemon: forked from the caller when that is safe, else a fresh interpreter.

A fresh interpreter costs 0.1-0.2 s before it does anything (more with a cold page cache), and
every millisecond of a mount is container start-up latency. Forking the process that already has
lazyfs imported skips that; it is only safe while the process has a single thread (a fork copies
no other threads but all their locks), so a caller with threads still running gets the exec path.
The node agent has threads, so its daemons come from its fork server (lazyfs.node.forker).
Setting LAZYFS_DAEMON_EXEC=1 forces the exec path (to debug it, or to run the daemon under a tool
that follows exec, like strace -f or py-spy); docs/architecture.md says so too.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NoReturn

from lazyfs.fsutil import atomic_write
from lazyfs.proc.ident import is_running, process_id

JOIN_IDLE_THREADS = 0.2  # seconds to let finished pools' threads exit before deciding


class Forked:
    """The part of subprocess.Popen the mount and run code use, for a forked child. Collecting it
    is one thread's at a time (as Popen's is): a run waits for its runtime while a stop's thread
    waits with a timeout, and the loser of two waitpid calls would get ECHILD."""

    def __init__(self, pid: int, args: list[str] | None = None):
        self.pid = pid
        self.args = args or [f"(forked {pid})"]
        self.returncode: int | None = None
        self._collecting = threading.Lock()

    def poll(self) -> int | None:
        # (another thread collecting it: it has not been collected yet, as far as this one knows)
        if self.returncode is None and self._collecting.acquire(blocking=False):
            try:
                if self.returncode is None:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                    if pid == self.pid:
                        self.returncode = os.waitstatus_to_exitcode(status)
            finally:
                self._collecting.release()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and timeout is not None:
            try:
                fd = os.pidfd_open(self.pid)  # readable once the child has exited
            except ProcessLookupError:
                fd = None  # collected by another thread just now: its returncode follows below
            if fd is not None:
                try:
                    if not readable(fd, timeout):
                        raise subprocess.TimeoutExpired(self.args, timeout)
                finally:
                    os.close(fd)
        with self._collecting:
            if self.returncode is None:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def readable(fd: int, timeout: float | None) -> bool:
    """Whether ``fd`` becomes readable within ``timeout`` seconds (None: wait). poll(2), not
    select(2): a process holding many pidfds has descriptor numbers past select's 1024."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000))))


def single_threaded() -> bool:
    """True if this is the main thread and the only one (after letting finished pools' threads
    exit: a closed executor's idle workers leave within moments)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join(JOIN_IDLE_THREADS)
    return threading.active_count() == 1


class Watched(Forked):
    """A process another one forked for us (the node's fork server, lazyfs.node.forker), watched
    through a pidfd. Its exit status is its parent's to collect, so ``returncode`` is -1 once it
    has exited."""

    def __init__(self, pid: int, pidfd: int, args: list[str] | None = None):
        super().__init__(pid, args)
        self.pidfd = pidfd

    def poll(self) -> int | None:
        return self._exited(0)

    def wait(self, timeout: float | None = None) -> int:
        if self._exited(timeout) is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self.pidfd, sig)  # never a reused pid
            except ProcessLookupError:  # exited (and reaped by its parent) already
                pass

    def _exited(self, timeout: float | None) -> int | None:
        if self.returncode is None and readable(self.pidfd, timeout):
            self.returncode = -1
            os.close(self.pidfd)
        return self.returncode

    def __del__(self):
        if self.returncode is None:
            os.close(self.pidfd)


def write_owner(path: Path, **extra) -> None:
    """Name this process (process_id, and ``extra``) as the owner of what ``path`` stands for.
    Whole or not at all (a half-written record reads as none, and its directory is never swept)."""
    atomic_write(path, json.dumps({**process_id(), **extra}).encode(), path.parent, durable=False)


def remove_owned(directory: Path, owner: str) -> None:
    """Remove ``directory``, its ``owner`` record last: a removal cut short (a SIGKILL) leaves a
    directory whose record still says who made it, for the next sweep to finish."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name != owner:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    with contextlib.suppress(OSError):
        os.unlink(directory / owner)
    shutil.rmtree(directory, ignore_errors=True)


def gone_owner(path: Path) -> dict | None:
    """The record write_owner left at ``path`` if its process no longer runs; None while it
    runs, or when there is no readable record (one being set up is not ours to judge)."""
    try:
        owner = json.loads(path.read_text())
        if not isinstance(owner["pid"], int) or "start" not in owner:
            return None
    except (OSError, ValueError, TypeError, KeyError):
        return None  # (a malformed record, too: no process of ours wrote it)
    return None if is_running(owner) else owner


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where a Ctrl-C raises KeyboardInterrupt (stopping_like_ctrl_c)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stopping_like_ctrl_c():
    """Within the block, SIGTERM and SIGHUP stop the main thread as a Ctrl-C does, so that work
    whose Ctrl-C path stops what it started and tears everything down (a restore, a snapshot
    run) takes that path for a `kill` too, rather than dying with its mounts left behind. Not
    for code that forwards these signals itself (a run's supervisor installs its own handlers
    inside, and puts these back when it is done)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated(signum)

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextmanager
def holding_sigint():
    """Ctrl-C held back while a process is started: it arrives once the block ends, when the
    caller holds the handle it needs to stop what it started. One that came just before is
    raised here, before anything starts: Python runs a pending signal's handler at its next
    Python call, and inside os.fork that is an at-fork hook (logging has them), where the
    interpreter prints the KeyboardInterrupt and drops it. A child started inside inherits the
    blocked mask: a forked one sets it back (fork_detached's daemon, the restorer's criu); an
    exec'd daemon keeps SIGINT blocked, in a session of its own that no terminal Ctrl-C reaches
    (it is stopped with SIGTERM)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, set())  # the mask as it is
    try:
        # (a handler already pending runs inside this call, after the mask changed: hence the try)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        _run_pending_handlers()
        yield held
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _run_pending_handlers() -> None:
    """(Empty: entering a Python function is where the interpreter runs pending handlers.)"""


def start(exec_args: list[str], run: Callable[[], int], log_file: Path, keep_fd: int,
          debug: bool = False, forker=None):
    """Start the daemon detached (new session, stdin /dev/null, output to log_file) and return a
    Popen-like handle. ``run`` is what the daemon's main would do, called in a forked child;
    ``exec_args`` start it in a new interpreter instead when forking is not safe. ``forker``: a
    fork server (lazyfs.node.forker) that forks it for a caller with threads."""
    exec_path = bool(os.environ.get("LAZYFS_DAEMON_EXEC"))
    if forker is not None and not exec_path:
        return forker.spawn(exec_args, log_file, keep_fd, debug)
    if exec_path or not single_threaded():
        with open(log_file, "ab") as out:
            return subprocess.Popen(exec_args, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    pass_fds=(keep_fd,), start_new_session=True, close_fds=True)
    return Forked(fork_detached(run, log_file, keep_fd, debug))


_LET_GO: list = []  # a forked daemon's inherited stdio objects and log handlers (fork_detached)


def fork_detached(run: Callable[[], int], log_file: Path | str, keep_fd: int, debug: bool = False) -> int:
    """Fork a child that detaches (new session, stdin /dev/null, output to log_file, only
    ``keep_fd`` kept) and runs ``run``; its pid. Only safe in a single-threaded caller."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid

    def daemon() -> int:
        # Not the caller's signal wakeup fd (the node agent's self-pipe): its number is reused
        # below, and a signal would write a byte into whatever file got it.
        signal.set_wakeup_fd(-1)
        os.setsid()
        # Finalize the caller's garbage now, while its descriptors are still its own: a socket
        # object collected after the closerange below would close whatever reused its number
        # (a new connection of the daemon's: "Bad file descriptor").
        gc.collect()
        # Keep only stdio and the readiness pipe, as close_fds does on the exec path: an inherited
        # copy of the caller's stdout pipe would keep its reader waiting for the daemon to exit.
        maxfd = os.sysconf("SC_OPEN_MAX")
        os.closerange(3, keep_fd)
        os.closerange(keep_fd + 1, maxfd if maxfd > 0 else 65536)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # the caller held it across the fork
        # The caller's stdio objects and log handlers are let go without closing them: one on a
        # descriptor the closerange above took fails to close ("Bad file descriptor": the
        # daemon died before it served), or would write into, or close, whatever reuses its
        # number. Kept referenced, so that no finalizer closes one later either.
        _LET_GO.extend((sys.stdout, sys.stderr))
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for handler in list(getattr(logger, "handlers", ())):  # (placeholders have none)
                _LET_GO.append(handler)
                logger.removeHandler(handler)
        logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if debug else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
        return run()
    child(daemon)


def child(body: Callable[[], int | None], failed: int = 1,
          last: Callable[[int], None] = lambda code: None) -> NoReturn:
    """The end of every forked child: run ``body`` and _exit with its code, never returning into
    the parent's stack. A SystemExit gives its code (a message is printed, as the interpreter
    would); anything else is printed and exits ``failed``. ``last(code)`` runs after stdio is
    flushed (say, to report the code to someone)."""
    code = failed
    try:
        got = body()
        code = 0 if got is None else got
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            last(code)
        except BaseException:
            pass
        os._exit(code)


def wait_ready(fd: int, proc, timeout: float, accept: tuple[bytes, ...] = (b"1",)) -> bytes | None:
    """The byte the daemon writes to its readiness pipe once it serves, if it is one of
    ``accept``; None if it exits or the time runs out first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            got = os.read(fd, 1)
            return got if got in accept else None
        if proc.poll() is not None:
            return None
    return None

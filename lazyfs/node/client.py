"""Talking to the node agent: connect (starting one when none runs), ask, map errors back.

`lazyfs run` and `lazyfs mount` are clients. The first of them on a node starts the agent
(`lazyfs node`, detached, its log in the node directory); a file lock makes sure two clients
starting at once start one agent. A socket left by a dead agent is removed and replaced.
"""
from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from lazyfs import environ, errors, paths
from lazyfs.errors import NodeError, NodeUnavailable
from lazyfs.node import wire

START_TIMEOUT = 20.0  # seconds a started agent may take to answer
def enabled() -> bool:
    mode = environ.node_mode()
    if mode not in environ.NODE_MODES:
        raise NodeError(f"{environ.NODE} must be one of {', '.join(environ.NODE_MODES)}, not {mode!r}")
    return mode == "auto"


def _not_root(path: Path) -> NodeError:
    return NodeError(f"the node agent serves root only (socket {path}, mode 0600): run lazyfs "
                     "run/mount as root")


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        wire.check_root_peer(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(autostart: bool = True) -> socket.socket:
    path = paths.node_socket()
    if os.geteuid() != 0:
        raise _not_root(path)
    try:
        return _connect(path)
    except PermissionError:
        raise _not_root(path) from None
    except (FileNotFoundError, ConnectionRefusedError):
        if not autostart:
            raise NodeUnavailable(f"no node agent answers on {path} (start one: lazyfs node)") from None
    return _start_agent(path)


def _start_agent(path: Path) -> socket.socket:
    node = paths.node_dir()
    node.mkdir(parents=True, exist_ok=True)
    os.chmod(node, 0o700)
    log_file = node / "agent.log"
    with open(node / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one client starts it; the others find it running
        try:
            return _connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        with open(log_file, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "lazyfs.cli", "node", "--socket", str(path),
                                     "--on-demand"],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                return _connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            if proc.poll() is not None:
                tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
                raise NodeUnavailable(f"the node agent exited at start ({proc.returncode}); log "
                                      f"{log_file}: " + " | ".join(tail))
            time.sleep(0.005)
        raise NodeUnavailable(f"the node agent did not answer on {path} within {START_TIMEOUT:.0f} s; log {log_file}")


def _raise(answer: dict) -> None:
    kind = getattr(errors, str(answer.get("kind")), None)
    exc = kind if isinstance(kind, type) and issubclass(kind, errors.LazyfsError) else NodeError
    err = exc.__new__(exc)
    errors.LazyfsError.__init__(err, str(answer.get("error", "the node agent refused the request")))
    raise err


def call(op: str, autostart: bool = True, fds: list[int] = (), **fields) -> dict:
    """One request on a fresh connection; the answer, or the error it carries raised as its type."""
    sock = connect(autostart)
    try:
        wire.send(sock, {"op": op, **fields}, fds)
        answer = wire.LineReader(sock).read_message()
    except OSError as exc:
        raise NodeUnavailable(f"the node agent broke off the {op} request ({exc}); see "
                              f"{paths.node_dir() / 'agent.log'}") from None
    finally:
        sock.close()
    if answer is None:
        raise NodeUnavailable(f"the node agent closed the connection during {op}; see "
                              f"{paths.node_dir() / 'agent.log'}")
    if not answer.get("ok"):
        _raise(answer)
    return answer


def where(source, cache_dir: str | None) -> dict:
    """The store and cache directory as this process means them (its environment's defaults, its
    working directory), spelled so the agent, with its own environment and directory, reads the
    same ones."""
    from dataclasses import replace
    store = source.store or (None if source.servers else paths.default_store())
    if store and "://" not in store:
        store = os.path.abspath(store)
    return {"source": replace(source, store=store).args(),
            "cache_dir": os.path.abspath(cache_dir or paths.default_cache_dir())}


def acquire(ref: str, source, cache_dir: str | None, data_path: str, profile: str,
            complete: bool, workload: str | None = None) -> dict:
    """A lease on the image's shared mount for this process: digest, mountpoint, config, lease.
    ``workload``: the run's command key, whose startup profile a new mount learns."""
    return call("acquire", ref=ref, data_path=data_path, profile=profile, complete=complete,
                workload=workload, **where(source, cache_dir))


def release(lease: str) -> None:
    call("release", lease=lease)

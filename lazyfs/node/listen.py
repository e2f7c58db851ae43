"""The agent's socket: claiming it, and what it means to find one taken.

The socket is root's alone: created mode 0600 under a umask (no moment where another user can
connect), in a directory made 0700 when the agent makes it (one that was there keeps its mode);
clients check that root answers on it before they send anything. A socket nothing answers on was left by an agent that died,
and is replaced; one that answers belongs to a live agent, which is left alone unless the new
one takes over (`lazyfs node --takeover`): then the old agent is asked to hand over (it exits,
leaving every mount up for the new one to adopt) and waited for. Readiness goes to systemd
(Type=notify) once the agent serves.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from lazyfs import paths
from lazyfs.errors import NodeError
from lazyfs.node import wire
from lazyfs.proc.ident import proc_start

log = logging.getLogger("lazyfs.node")
MAX_PATH = 100  # bytes of a Unix socket path (sun_path is 108, with room to spare)
HANDOFF_WAIT = 10.0  # seconds a running agent gets to hand over and exit


def claim(path: Path, takeover: bool, on_demand: bool = False) -> socket.socket:
    """The agent's listening socket on ``path`` (non-blocking), and its pid file written. An agent
    started on purpose (systemd's) takes over from one a client started on demand: one a run
    started while the node's own agent restarted (its socket gone for a moment) would otherwise
    keep the node, with the client's settings (no cache cap, say), and the supervisor's agent
    would fail to start again and again."""
    if len(os.fsencode(path)) > MAX_PATH:
        raise NodeError(f"socket path {path} is too long for a Unix socket (at most {MAX_PATH} "
                        "bytes); set --socket or LAZYFS_NODE_SOCKET")
    if not path.parent.exists():
        # Made here, it is ours to close to others. One that was there (/tmp, /run: --socket and
        # LAZYFS_NODE_SOCKET may name any) keeps its mode: the socket itself is born 0600, and a
        # client checks that root answers on it (client.connect).
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
    paths.node_dir().mkdir(parents=True, exist_ok=True)
    os.chmod(paths.node_dir(), 0o700)
    if path.exists():
        hello = _ask(path, "hello", 2.0) or {}
        pid = _pid(hello)
        if pid is not None and not takeover and not on_demand and hello.get("on_demand"):
            log.info("taking over from the agent a run started on demand (pid %d)", pid)
            takeover = True
        if pid is not None and not takeover:
            raise NodeError(f"a node agent already runs on {path} (pid {pid}); "
                            "`lazyfs node --takeover` replaces it without unmounting anything")
        if pid is not None:
            _hand_off(path, pid)
        path.unlink(missing_ok=True)  # stale: its agent died without removing it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is born 0600: no moment where another user can connect
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(64)
    sock.setblocking(False)
    (paths.node_dir() / "agent.pid").write_text(f"{os.getpid()}\n")
    return sock


def live_agent(path: Path) -> int | None:
    """The pid of the agent answering on ``path``, or None if nothing answers (a stale socket)."""
    return _pid(_ask(path, "hello", 2.0) or {})


def _pid(hello: dict) -> int | None:
    try:
        return int(hello.get("pid", 0)) or None
    except (TypeError, ValueError):
        return None


def _ask(path: Path, op: str, timeout: float) -> dict | None:
    """One request to whatever agent listens on ``path``; None if none answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        wire.check_root_peer(sock, path)  # (anyone else's is no agent: a stale socket)
        wire.send(sock, {"op": op})
        return wire.LineReader(sock).read_message()
    except (OSError, NodeError):
        return None
    finally:
        sock.close()


def _hand_off(path: Path, pid: int) -> None:
    """Ask the running agent to leave everything mounted and exit, and wait until it has."""
    _ask(path, "handoff", HANDOFF_WAIT)
    deadline = time.monotonic() + HANDOFF_WAIT
    while proc_start(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    if proc_start(pid) is not None:
        raise NodeError(f"the running agent (pid {pid}) did not hand over within {HANDOFF_WAIT:.0f} s")


def sd_notify(state: str) -> None:
    """systemd's Type=notify readiness: one datagram to $NOTIFY_SOCKET, if there is one."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(state.encode(), addr)
        except OSError as exc:
            log.warning("NOTIFY_SOCKET %s: %s", addr, exc)

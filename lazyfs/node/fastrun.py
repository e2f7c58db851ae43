"""`lazyfs run` through the agent's zygote (lazyfs.node.zygote): hand the command line, working
directory, environment and stdio descriptors to the agent, forward signals, return the exit code.

This runs before anything else in `lazyfs run`, and every millisecond of it is container start-up,
so it imports nothing but the interpreter's built-in modules: `_socket` and `_signal` rather than
`socket` and `signal` (which import enum), and no json (which imports re): the one request is
written by `_json_text` and the two answers, which the agent sends in a fixed form, are read by
`_field`. Measured here: 27 ms for this module against 92 ms with json, pathlib and platformdirs.

It gives up (None: the full CLI runs instead, and starts an agent if need be) when no agent
answers, when the run is interactive (a terminal on stdin and stdout: the container then needs the
terminal as its own), or when the agent declines.
"""
from __future__ import annotations

import _signal
import _socket
import os
import sys

from lazyfs import environ

SIGINT, SIGTERM, SIGHUP, SIGQUIT = 2, 15, 1, 3
SCM_RIGHTS = 1


def socket_path() -> str:
    """lazyfs.paths.node_socket(), without importing pathlib and platformdirs when the path is
    given (as the systemd unit in docs/node.md gives it)."""
    given = environ.node_socket()
    if given:
        return given
    from lazyfs import paths
    return str(paths.node_socket())


def _json_text(value) -> str:
    """JSON for strings, lists of strings and objects of strings (what the request holds)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{_json_text(k)}:{_json_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_json_text(v) for v in value) + "]"
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or 0xD800 <= code <= 0xDFFF:  # control characters; surrogate-escaped bytes
            out.append("\\u%04x" % code)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _field(line: bytes, name: bytes) -> int | None:
    """The integer ``name`` of an answer like ``{"ok": true, "pid": 123}`` or ``{"exit": 0}``."""
    _, found, rest = line.partition(b'"' + name + b'":')
    if not found:
        return None
    digits = rest.strip().split(b",")[0].split(b"}")[0].strip()
    try:
        return int(digits)
    except ValueError:
        return None


class _Lines:
    """The agent's answers, a line at a time. Both can come in one recv (a run that ends at once,
    on a loaded node): what follows the first line is kept for the second read."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def next(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(4096)  # retried across the signals we forward (PEP 475)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"


def try_run(argv: list[str]) -> int | None:
    if environ.node_mode() != "auto" or os.geteuid() != 0:
        return None  # off, or not root: the CLI says what is wrong in its own words
    if os.isatty(0) and os.isatty(1):
        return None
    options = argv[:argv.index("--")] if "--" in argv else argv
    if "--no-node" in options:
        return None  # mounts on its own: nothing to gain from the agent
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(socket_path())
        # Root's agent only (lazyfs.node.wire.check_root_peer): the slow path says why not.
        if int.from_bytes(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)[4:8],
                          sys.byteorder) != 0:
            raise OSError("not root's agent")
    except OSError:
        sock.close()
        return None
    try:
        request = {"op": "exec", "argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ)}
        data = (_json_text(request) + "\n").encode("utf-8", "surrogatepass")
        try:
            sock.sendmsg([data[:1]], [(_socket.SOL_SOCKET, SCM_RIGHTS, bytes(_fds(0, 1, 2)))])
            sock.sendall(data[1:])
            lines = _Lines(sock)
            answer = lines.next()
        except OSError:
            return None
        worker = _field(answer, b"pid") if b'"ok":true' in answer.replace(b" ", b"") else None
        if worker is None or worker <= 0:  # (a pid of 0 or -1 would signal a group, or all)
            return None

        def forward(signum, frame):
            try:
                if signum == SIGINT:  # what a terminal does: the whole foreground group
                    os.killpg(worker, signum)
                else:
                    os.kill(worker, signum)
            except ProcessLookupError:
                pass
        for sig in (SIGINT, SIGTERM, SIGHUP, SIGQUIT):
            _signal.signal(sig, forward)
        code = _field(lines.next(), b"exit")
        if code is None:
            sys.stderr.write(f"lazyfs: error: the run (pid {worker}) ended without an exit status; "
                             "see the node agent's log (agent.log in its state directory)\n")
            return 1
        return code
    finally:
        sock.close()


def _fds(*fds: int):
    import array
    return array.array("i", fds)

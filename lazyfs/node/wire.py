"""The agent's wire format: one JSON object per line over a Unix stream socket, either way.

A request is ``{"op": NAME, ...}``; the answer is ``{"ok": true, ...}`` or ``{"ok": false,
"error": TEXT, "kind": EXCEPTION-CLASS}``. A request may carry file descriptors (SCM_RIGHTS) on its
first byte. Lines are at most MAX_LINE bytes, so a peer cannot make the other side buffer without
bound.
"""
from __future__ import annotations

import json
import socket

from lazyfs.errors import NodeError
from lazyfs.proc.syscalls import peer_credentials
from lazyfs.format.guard import JSON_ERRORS

MAX_LINE = 1 << 20
MAX_FDS = 8


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict:
    try:
        obj = json.loads(line)
    except JSON_ERRORS as exc:
        raise NodeError(f"malformed message from the node agent socket ({exc})") from None
    if not isinstance(obj, dict):
        raise NodeError("malformed message from the node agent socket (not an object)")
    return obj


class LineReader:
    """Splits a stream into lines, with any descriptors that arrived alongside."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.fds: list[int] = []

    def feed(self) -> bool:
        """One recv; False at end of stream."""
        data, fds, _, _ = socket.recv_fds(self.sock, 65536, MAX_FDS)
        self.fds += fds
        if not data:
            return False
        self.buf += data
        if len(self.buf) > MAX_LINE and b"\n" not in self.buf:
            raise NodeError(f"message longer than {MAX_LINE} bytes")
        return True

    def line(self) -> bytes | None:
        head, nl, rest = self.buf.partition(b"\n")
        if not nl:
            return None
        self.buf = rest
        return head

    def read_message(self) -> dict | None:
        """Block until one whole message (None at end of stream)."""
        while (line := self.line()) is None:
            if not self.feed():
                return None
        return decode(line)


def send(sock: socket.socket, obj: dict, fds: list[int] = ()) -> None:
    data = encode(obj)
    if fds:
        socket.send_fds(sock, [data[:1]], list(fds))
        data = data[1:]
    sock.sendall(data)


def check_root_peer(sock: socket.socket, path) -> None:
    """Refuse an agent socket another user answers on: one who bound the path first (a --socket
    in a shared directory) would get the client's environment, its stdio and its signals."""
    uid = peer_credentials(sock)[1]
    if uid != 0:
        raise NodeError(f"{path} is answered by a process of uid {uid}, not by root's node agent; "
                        "refusing it")

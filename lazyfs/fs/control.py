"""The mount daemon's control socket: `lazyfs stats` asks it for the counters.

An abstract Unix socket named after the mountpoint, so it needs no file to clean up after a crash
and no path length budget; it dies with the daemon. Counters travel here rather than through the
mount itself so that reading them never changes what the image looks like.
"""
from __future__ import annotations

import json
import os
import socket
import threading
from typing import Callable

from lazyfs import paths
from lazyfs.errors import MountError
from lazyfs.format.guard import JSON_ERRORS
from lazyfs.proc.syscalls import peer_credentials


def address(mountpoint: str) -> str:
    return f"\0lazyfs-{os.geteuid()}-{paths.mount_key(mountpoint)}"


def serve(mountpoint: str, stats: Callable[[], dict]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address(mountpoint))
        sock.listen(8)
    except OSError:  # (the mount goes on without it: its descriptor must not)
        sock.close()
        raise

    def loop() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed at unmount
            with conn:
                try:
                    conn.sendall(json.dumps(stats()).encode())
                except OSError:
                    pass

    threading.Thread(target=loop, name="lazyfs-control", daemon=True).start()
    return sock


MAX_ANSWER = 16 * 1024 * 1024  # bytes of counters: far more than a daemon's, bounded all the same
QUERY_TIMEOUT = 5.0  # seconds a user's `lazyfs stats` waits for a daemon's counters
SCRAPE_TIMEOUT = 1.0  # the node agent's own reads (status, /metrics): a busy daemon must not stall them


def query(mountpoint: str, timeout: float = QUERY_TIMEOUT) -> dict:
    """The daemon's counters. An abstract name has no permissions: any process may bind it, so
    only an answer from a process of this user counts, and only a JSON object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address(mountpoint))
            uid = peer_credentials(sock)[1]
            if uid != os.geteuid():
                raise MountError(f"{mountpoint}: its control socket is held by a process of uid "
                                 f"{uid}, not by its lazyfs daemon")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
                if len(data) > MAX_ANSWER:
                    raise MountError(f"{mountpoint}: its daemon's counters exceed {MAX_ANSWER} bytes")
        except OSError as exc:
            raise MountError(f"{mountpoint}: no lazyfs daemon answers for it ({exc.strerror or exc})") from None
    try:
        counters = json.loads(data)
    except JSON_ERRORS:
        counters = None
    if not isinstance(counters, dict):
        raise MountError(f"{mountpoint}: its control socket answered something other than counters")
    return counters

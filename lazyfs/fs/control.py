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


def address(mountpoint: str) -> str:
    return f"\0lazyfs-{os.geteuid()}-{paths.mount_key(mountpoint)}"


def serve(mountpoint: str, stats: Callable[[], dict]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address(mountpoint))
    sock.listen(8)

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


QUERY_TIMEOUT = 5.0  # seconds a user's `lazyfs stats` waits for a daemon's counters
SCRAPE_TIMEOUT = 1.0  # the node agent's own reads (status, /metrics): a busy daemon must not stall them


def query(mountpoint: str, timeout: float = QUERY_TIMEOUT) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address(mountpoint))
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as exc:
            raise MountError(f"{mountpoint}: no lazyfs daemon answers for it ({exc.strerror or exc})") from None
    return json.loads(data)

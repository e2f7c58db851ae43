"""The emulated network link: a network namespace of our own whose loopback is shaped by tbf.

Server and node both talk over that loopback, so every byte a node fetches crosses the shaped
link. This kernel has no netem, so latency is added by the servers themselves (``lazyfs serve
--delay``, and the same in the pull baseline's blob server), once per request: a request/response
pair pays one round trip. The harness process enters the namespace (setns) after building its
images, so everything it then starts (servers, runs, HTTP probes) is on the link.
"""
from __future__ import annotations

import ctypes
import os
import re
import subprocess

from lazyfs.errors import LazyfsError

CLONE_NEWNET = 0x40000000
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)?bit$", re.I)


class LinkError(LazyfsError):
    pass


def rate_bits(text: str) -> float:
    """'1gbit' → 1e9; the tc spelling, as --link takes it."""
    m = _RATE.match(text.strip())
    if not m:
        raise LinkError(f"not a link rate: {text!r} (use e.g. 100mbit, 1gbit, 10gbit)")
    return float(m.group(1)) * {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}[(m.group(2) or "").lower() or None]


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LinkError(f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _run(*args: str) -> None:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise LinkError(f"{' '.join(args)}: {(proc.stderr or proc.stdout).strip()}")


class Link:
    """``with Link("1gbit"):`` — this thread (and what it starts) is on the shaped loopback."""

    def __init__(self, rate: str = "1gbit", name: str | None = None):
        self.rate = rate
        self.bits = rate_bits(rate)
        self.name = name or f"lazyfs-bench-{os.getpid()}"
        self._home_fd: int | None = None

    def __enter__(self) -> "Link":
        if os.geteuid() != 0:
            raise LinkError("the benchmark link needs root (ip netns, tc)")
        # setns(CLONE_NEWNET) moves only the calling thread; what it starts afterwards (processes,
        # threads) inherits it. The harness does all its network work from this thread.
        _run("ip", "netns", "add", self.name)
        try:
            ns = f"/run/netns/{self.name}"
            _run("ip", "-n", self.name, "link", "set", "lo", "up")
            # burst: at least one 64 KiB TSO segment plus what the rate sends in a 1 ms tick.
            burst = max(256 * 1024, int(self.bits / 8 / 1000) * 2)
            _run("ip", "netns", "exec", self.name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
                 "rate", self.rate, "burst", str(burst), "latency", "50ms")
            self._home_fd = os.open(f"/proc/{os.getpid()}/ns/net", os.O_RDONLY)
            _setns(ns)
        except BaseException:
            subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)
            raise
        return self

    def describe(self) -> str:
        return f"{self.rate} tbf on loopback in netns {self.name}"

    def __exit__(self, *exc) -> None:
        if self._home_fd is not None:
            _setns(f"/proc/self/fd/{self._home_fd}")
            os.close(self._home_fd)
            self._home_fd = None
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)

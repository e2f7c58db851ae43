"""snapshot.guard's end: what it kills once the restore that started criu is gone."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from snapshot import guard

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare(1) for a mount namespace")


def _gone(proc: subprocess.Popen, within: float = 10.0) -> bool:
    try:
        proc.wait(within)
        return True
    except subprocess.TimeoutExpired:
        return False


def _running_as(proc: subprocess.Popen, argv: list[str]) -> None:
    """Wait until the child's command line reads as ``argv``: Popen returns once exec closed its
    pipe, a moment before the kernel sets the new program's arguments, when it still reads empty."""
    want = "\0".join(argv).encode() + b"\0"
    deadline = time.monotonic() + 10
    while True:
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            if f.read() == want:
                return
        assert time.monotonic() < deadline, f"{argv} never showed as the child's command line"
        time.sleep(0.001)


def test_everything_in_criu_s_mount_namespace_is_killed_whatever_it_runs_as():
    """A task criu cloned just before the restore died, never seen as a root and running as
    the program by then, is found by the mount namespace criu made it in; a process outside
    it, running the same program, is left alone."""
    inside = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "60"])
    outside = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{inside.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            assert time.monotonic() < deadline, "unshare did not make its namespace"
            time.sleep(0.01)
        made_in = os.open(f"/proc/{inside.pid}/ns/mnt", os.O_RDONLY)  # (held, as the guard holds it)
        try:
            assert guard._end({}, ["/no/such/criu", "restore"], made_in) == 0
        finally:
            os.close(made_in)
        assert _gone(inside)
        assert outside.poll() is None
    finally:
        for proc in (inside, outside):
            proc.kill()
            proc.wait()


def test_a_namespace_that_is_not_criu_s_alone_kills_nothing_by_namespace():
    """criu in the restore's own mount namespace (or one that cannot be read): then nothing is
    killed for being in it, only what runs as this very criu."""
    assert guard._made_in(os.getpid()) is None
    bystander = subprocess.Popen(["sleep", "60"])
    criu_like = subprocess.Popen(["sleep", "61"])
    try:
        _running_as(criu_like, ["sleep", "61"])
        guard._end({}, ["sleep", "61"], None)
        assert _gone(criu_like)
        assert bystander.poll() is None
    finally:
        for proc in (bystander, criu_like):
            proc.kill()
            proc.wait()

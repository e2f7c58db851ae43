"""Mounting and unmounting, from the caller's side: start the FUSE daemon (lazyfs.fs.daemon),
wait for its readiness handshake, record its state, find and clean dead mounts, unmount.

`lazyfs mount` starts the daemon detached (new session, output to a log file) and returns once
the kernel answers on the mountpoint; `--foreground` runs the daemon's code in-process.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from lazyfs import paths
from lazyfs.errors import MountError
from lazyfs.fs import spawn
from lazyfs.fs.daemon import DaemonArgs, run_daemon
from lazyfs.remote.source import Source
from lazyfs.store import objects

log = logging.getLogger("lazyfs.mount")
FS_TYPE = "fuse.lazyfs"


@dataclass
class MountState:
    mountpoint: str
    pid: int
    digest: str
    ref: str
    store: str
    cache_dir: str
    log_file: str


def _state_file(mountpoint: str) -> Path:
    return paths.state_dir() / "mounts" / f"{paths.mount_key(mountpoint)}.json"


def read_state(mountpoint: str) -> MountState | None:
    try:
        return MountState(**json.loads(_state_file(mountpoint).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def mount_entry(mountpoint: str) -> dict | None:
    """The /proc/self/mountinfo line for mountpoint, as a dict, if something is mounted there."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            mp = fields[4].encode().decode("unicode_escape")
            if mp == target:
                fstype, source = right.split()[:2]
                return {"fstype": fstype, "source": source}
    return None


def is_stale(mountpoint: str) -> bool:
    # stat() of the root can be answered from the kernel's attribute cache; statfs always asks
    # the daemon, so it is what reveals a dead one.
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _fusermount(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("fusermount") or shutil.which("fusermount3")
    # Without fusermount (root only), umount does the same; its lazy flag is -l, not -z.
    cmd = [exe, *args] if exe else ["umount", *[{"-z": "-l"}.get(a, a) for a in args if a != "-u"]]
    return subprocess.run(cmd, capture_output=True, text=True)


def clean_stale(mountpoint: str) -> bool:
    """A daemon killed hard leaves "Transport endpoint is not connected": unmount it lazily."""
    if not is_stale(mountpoint):
        return False
    log.warning("%s: the lazyfs daemon behind this mount is gone; unmounting the dead mount", mountpoint)
    _fusermount("-u", "-z", mountpoint)
    return True


def mount(ref: str, mountpoint: str, source: Source, cache_dir: str | None,
          log_file: str | None = None, timeout: float = 30.0, debug: bool = False,
          trace: str | None = None, profile: str = "auto", checked: bool = False) -> MountState:
    """Start a detached daemon and wait until the mount answers. ``checked``: the caller has
    resolved ``ref`` to a manifest digest and verified that manifest already (lazyfs run)."""
    mnt = os.path.realpath(mountpoint)
    clean_stale(mnt)
    if not os.path.isdir(mnt):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if mount_entry(mnt):
        raise MountError(f"{mountpoint} is already a mountpoint (lazyfs umount {mountpoint} first)")
    with os.scandir(mnt) as it:
        if next(it, None) is not None:
            raise MountError(f"mountpoint {mountpoint} is not empty (its files would be hidden)")
    digest = ref
    named_profile = profile not in ("auto", "none")
    # Fail here, in the user's terminal, not in a log file; but every manifest fetch is start-up
    # latency, so do not repeat the check a caller (lazyfs run) has made.
    if not checked or named_profile:
        reader = source.open()
        try:
            if not checked:
                digest = objects.resolve(reader, ref)
                objects.read_config(reader, digest)
            if named_profile:
                from lazyfs import profiles
                profiles.load(reader, digest, profile)
        finally:
            reader.close()
    cache = str(cache_dir or paths.default_cache_dir())
    logf = Path(log_file) if log_file else paths.state_dir() / "mounts" / (
        _state_file(mnt).stem + ".log")
    logf.parent.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    args = DaemonArgs(digest, source, cache, mnt, str(ref), write_fd, debug,
                      os.path.abspath(trace) if trace else None, profile)
    proc = spawn.start([sys.executable, "-m", "lazyfs.fs.daemon", *args.argv()],
                       partial(run_daemon, args), logf, write_fd, debug)
    os.close(write_fd)
    try:
        if not spawn.wait_ready(read_fd, proc, timeout):
            tail = logf.read_text(errors="replace").strip().splitlines()[-5:]
            raise MountError(f"mount of {ref} on {mountpoint} failed; log {logf}:\n  "
                             + "\n  ".join(tail))
        state = MountState(mnt, proc.pid, digest, str(ref), source.describe(), cache, str(logf))
        _state_file(mnt).parent.mkdir(parents=True, exist_ok=True)
        _state_file(mnt).write_text(json.dumps(asdict(state)))
        return state
    except BaseException:  # a failure, or Ctrl-C at any point: no daemon or half-made mount left
        _abandon(proc, mnt)
        raise
    finally:
        os.close(read_fd)


def _abandon(proc: subprocess.Popen, mnt: str) -> None:
    proc.kill()
    proc.wait()
    if mount_entry(mnt):
        _fusermount("-u", "-z", mnt)


def umount(mountpoint: str, lazy: bool = False, timeout: float = 15.0) -> None:
    mnt = os.path.realpath(mountpoint)
    state = read_state(mnt)
    entry = mount_entry(mnt)
    if entry is None and not is_stale(mnt):
        _state_file(mnt).unlink(missing_ok=True)
        raise MountError(f"{mountpoint} is not mounted")
    if entry and entry["fstype"] != FS_TYPE:
        raise MountError(f"{mountpoint} is a {entry['fstype']} mount, not lazyfs")
    res = _fusermount("-u", *(["-z"] if lazy else []), mnt)
    if res.returncode != 0 and mount_entry(mnt):
        msg = (res.stderr or res.stdout).strip()
        if "busy" in msg:
            raise MountError(f"{mountpoint} is busy (a process is using it); stop it or use --lazy")
        raise MountError(f"unmounting {mountpoint} failed: {msg}")
    if state:
        _wait_exit(state.pid, timeout)
    _state_file(mnt).unlink(missing_ok=True)


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # When this process started the daemon (lazyfs run), reap it: a zombie still "exists".
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    log.warning("daemon %d did not exit after unmount; sending SIGTERM", pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass

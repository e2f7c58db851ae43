"""Mounting and unmounting: the FUSE daemon process, its readiness handshake, state and logs.

`lazyfs mount` starts this module as a detached process (new session, output to a log file) and
returns once the kernel answers on the mountpoint; `--foreground` runs the same code in-process.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
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
from lazyfs.errors import LazyfsError, MountError
from lazyfs.fs import control, spawn
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
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return paths.state_dir() / "mounts" / f"{key}.json"


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
    args = [sys.executable, "-m", "lazyfs.fs.daemon", "--digest", digest, *source.args(),
            "--cache-dir", cache, "--ready-fd", str(write_fd), "--ref", str(ref), mnt]
    if debug:
        args.append("--debug")
    if trace:
        args += ["--trace", os.path.abspath(trace)]
    if profile != "auto":
        args += ["--profile", profile]
    proc = spawn.start(args, lambda: run_daemon(digest, source, cache, mnt, str(ref), write_fd, debug,
                                                 os.path.abspath(trace) if trace else None, profile),
                       logf, write_fd, debug)
    os.close(write_fd)
    try:
        ready = spawn.wait_ready(read_fd, proc, timeout)
    except BaseException:  # Ctrl-C while waiting: leave no daemon or half-made mount behind
        _abandon(proc, mnt)
        raise
    finally:
        os.close(read_fd)
    if not ready:
        _abandon(proc, mnt)
        tail = logf.read_text(errors="replace").strip().splitlines()[-5:]
        raise MountError(f"mount of {ref} on {mountpoint} failed; log {logf}:\n  " + "\n  ".join(tail))
    state = MountState(mnt, proc.pid, digest, str(ref), source.describe(), cache, str(logf))
    _state_file(mnt).parent.mkdir(parents=True, exist_ok=True)
    _state_file(mnt).write_text(json.dumps(asdict(state)))
    return state


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


def serve(digest: str, source: Source, cache_dir: str, mountpoint: str, ref: str = "",
          ready_fd: int | None = None, debug: bool = False, trace: str | None = None,
          profile: str = "auto") -> None:
    """Run the FUSE filesystem in this process until unmounted."""
    from fuse import FUSE

    from lazyfs.cache.nodecache import NodeCache
    from lazyfs.cache.prefetcher import fetch_missing
    from lazyfs.fs.fuseops import CODEC, LazyOps
    from lazyfs.fs.index import ImageIndex

    reader = source.open()
    manifest = objects.read_manifest(reader, digest)
    index = ImageIndex(manifest)
    cache = NodeCache(cache_dir, reader.fetch_block)
    prefetcher = _prefetcher(reader, digest, manifest, cache, profile)
    trace_file = open(trace, "a", encoding="utf-8", errors="surrogateescape") if trace else None

    def extra() -> dict:
        out = {"store": reader.stats.snapshot(), "digest": digest}
        if prefetcher:
            out["prefetch"] = prefetcher.stats.snapshot()
        return out
    # A profile knows what the workload reads; guessing by directory would only add bytes.
    siblings = source.siblings and prefetcher is None
    ops = LazyOps(index, cache, extra, trace_file, readahead=source.readahead,
                  fetch_siblings=partial(fetch_missing, cache, reader.fetch_blocks) if siblings else None)
    if ready_fd is not None:
        def init(path, _fd=ready_fd):
            os.write(_fd, b"1")
            os.close(_fd)
        ops.init = init
    has_xattrs = any(e.xattrs for e in manifest.entries)
    if not has_xattrs:
        # The kernel (and overlayfs above us) asks for xattrs on nearly every lookup; answering
        # ENOSYS once makes it stop asking for the life of the mount.
        ops.getxattr = ops.listxattr = None
    try:
        control_sock = control.serve(mountpoint, ops.stats)
    except OSError as exc:  # counters are a convenience: never fail a mount over them
        log.warning("no control socket for %s (%s): `lazyfs stats` will not answer", mountpoint, exc)
        control_sock = None
    log.info("mounting %s (%s) from %s on %s: %d entries, %d bytes, xattrs %s, cache %s",
             ref or digest, digest, source.describe(), mountpoint, len(manifest.entries),
             index.total_size, "yes" if has_xattrs else "none", cache_dir)
    FUSE(ops, mountpoint, foreground=True, nothreads=False, encoding=CODEC, ro=True,
         allow_other=_may_allow_other(), default_permissions=True, use_ino=True, kernel_cache=True,
         attr_timeout=86400, entry_timeout=86400, negative_timeout=86400,
         fsname=f"lazyfs:{digest[7:19]}", subtype="lazyfs", debug=debug)
    if control_sock:
        control_sock.close()
    if prefetcher:
        prefetcher.stop()
    cache.close()
    reader.close()
    log.info("unmounted %s", mountpoint)


def _prefetcher(reader, digest: str, manifest, cache, choice: str):
    """Start fetching the image's startup profile, if it has one (or the one named)."""
    from lazyfs import profiles
    from lazyfs.cache.prefetcher import Prefetcher

    prof = profiles.load(reader, digest, choice)
    if prof is None:
        return None
    wanted = profiles.plan(prof, manifest, digest)
    log.info("startup profile: prefetching %d blocks (%d bytes)", len(wanted), sum(n for _, n in wanted))
    return Prefetcher(cache, reader.fetch_blocks, wanted).start()


def _may_allow_other() -> bool:
    """Containers run as other users need allow_other; FUSE grants it to root, and to others only
    when /etc/fuse.conf says user_allow_other."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lazyfs-daemon", description="internal: lazyfs FUSE daemon")
    p.add_argument("mountpoint")
    p.add_argument("--digest", required=True)
    Source.add_arguments(p)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--ref", default="")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--debug", action="store_true")
    p.add_argument("--trace")
    p.add_argument("--profile", default="auto")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    return run_daemon(a.digest, Source.from_namespace(a), a.cache_dir, a.mountpoint, a.ref, a.ready_fd,
                      a.debug, a.trace, a.profile)


def run_daemon(*args) -> int:
    """serve(*args) with its failures logged as one line and turned into an exit status."""
    try:
        serve(*args)
    except RuntimeError as exc:  # fusepy's way of saying fuse_main failed; libfuse said why above
        log.error("FUSE mount failed (status %s)", exc)
        return 1
    except (LazyfsError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

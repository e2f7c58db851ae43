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
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from lazyfs import paths
from lazyfs.fsutil import atomic_write
from lazyfs.errors import MetadataRefused, MountError
from lazyfs.fs import kernel
from lazyfs.proc import ident, spawn
from lazyfs.fs.daemon import DAEMON_NAME, REFUSED, DaemonArgs, run_daemon
from lazyfs.source.spec import Source
from lazyfs.records import objects

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
    layout: str = "fuse"  # "kernel": an overlay on the mountpoint (lazyfs.fs.kernel)
    runtime_dir: str = ""  # the kernel path's own mounts (metadata image, FUSE data layer)
    # The daemon's start time (lazyfs.proc.ident.process_id): with ``pid``, the daemon for good,
    # where the pid alone may name another process by the time of the unmount. None in a state
    # written before it was kept.
    start: int | None = None

    def kernel_layout(self) -> "kernel.Layout":
        return kernel.layout(self.cache_dir, self.digest, self.runtime_dir)


def _state_file(mountpoint: str) -> Path:
    return paths.state_dir() / "mounts" / f"{paths.mount_key(mountpoint)}.json"


def read_state(mountpoint: str) -> MountState | None:
    try:
        return MountState(**json.loads(_state_file(mountpoint).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def data_layers(mountpoint: str) -> str | None:
    """The overlay ``lowerdir`` of a kernel-path mount (its metadata image, then its data-only
    layers), so a writable overlay can sit on them directly instead of on the read-only overlay
    at ``mountpoint``: one overlay fewer on every lookup and read. None for a FUSE mount."""
    state = read_state(mountpoint)
    if state is None or state.layout != "kernel":
        return None
    return state.kernel_layout().lowerdir()


@dataclass(frozen=True)
class MountLine:
    """One line of /proc/self/mountinfo: paths as os functions take them (the kernel's octal
    escapes undone, bytes that are not UTF-8 surrogate-escaped), options as the kernel wrote them."""
    point: str
    fstype: str
    source: str
    options: str  # the filesystem's own (super) options: an overlay's lowerdir=..., say


_ESCAPED = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    return os.fsdecode(_ESCAPED.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def mount_table() -> list[MountLine]:
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.rstrip(b"\n").partition(b" - ")
            fstype, source, options = (right.split(b" ") + [b"", b""])[:3]
            out.append(MountLine(_unescape(left.split(b" ")[4]), os.fsdecode(fstype),
                                 _unescape(source), _unescape(options)))
    return out


LAYER_OPTIONS = ("lowerdir", "upperdir", "workdir", "lowerdir+", "datadir+")


def stacked_on(mountpoint: str) -> list[str]:
    """Overlays (their mountpoints) with one of the mount's own layers as a layer: ``mountpoint``
    itself, or on the kernel path its metadata image and FUSE data layer (what a run's overlay
    sits on, lazyfs.fs.mounts.data_layers). overlayfs holds private clones of its layers, so
    unmounting what lies under one is never "busy"; and with its daemon gone, its reads fail."""
    base = os.path.realpath(mountpoint)
    own = {base}
    state = read_state(mountpoint)
    if state is not None and state.layout == "kernel":
        layout = state.kernel_layout()
        own |= {os.path.realpath(layout.meta), os.path.realpath(layout.fuse)}
    out = []
    for m in mount_table():
        if m.fstype != "overlay" or m.point == base:  # (the image's own read-only overlay)
            continue
        for option in re.split(r"(?<!\\),", m.options):
            key, _, value = option.partition("=")
            layers = [re.sub(r"\\(.)", r"\1", p) for p in re.split(r"(?<!\\):+", value) if p]
            if key in LAYER_OPTIONS and own.intersection(layers):
                out.append(m.point)
                break
    return out


def mount_entry(mountpoint: str) -> dict | None:
    """The /proc/self/mountinfo line for mountpoint, as a dict, if something is mounted there."""
    target = os.path.realpath(mountpoint)
    for m in mount_table():
        if m.point == target:
            return {"fstype": m.fstype, "source": m.source}
    return None


def is_stale(mountpoint: str) -> bool:
    """Whether a mount is dead and must be cleaned away: its daemon is gone, or (kernel path) the
    overlay on its mountpoint is, while its metadata image or FUSE data layer is still mounted
    (unmounted by hand, or an unmount cut short by Ctrl-C). On the kernel path the mountpoint
    itself keeps answering (metadata and local data are the kernel's), so it is the FUSE data
    layer that tells whether the daemon lives."""
    state = read_state(mountpoint)
    lay = state.kernel_layout() if state is not None and state.layout == "kernel" else None
    # stat() of the root can be answered from the kernel's attribute cache; statfs always asks
    # the daemon, so it is what reveals a dead one.
    try:
        os.statvfs(str(lay.fuse) if lay else mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return True
    if lay is None:
        return False
    mounted = {m.point for m in mount_table()}
    return os.path.realpath(mountpoint) not in mounted and \
        bool(mounted & {os.path.realpath(lay.meta), os.path.realpath(lay.fuse)})


def _fusermount(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("fusermount") or shutil.which("fusermount3")
    # Without fusermount (root only), umount does the same; its lazy flag is -l, not -z.
    cmd = [exe, *args] if exe else ["umount", *[{"-z": "-l"}.get(a, a) for a in args if a != "-u"]]
    return subprocess.run(cmd, capture_output=True, text=True)


def clean_stale(mountpoint: str) -> bool:
    """A daemon killed hard leaves "Transport endpoint is not connected", an overlay unmounted by
    hand leaves the layers under it: unmount what is left lazily."""
    if not is_stale(mountpoint):
        return False
    log.warning("%s: the lazyfs daemon behind this mount is gone, or the overlay on it is; "
                "unmounting what is left of the dead mount", mountpoint)
    for path in _mounts_of(read_state(mountpoint), mountpoint):
        _unmount(path, lazy=True)
    _state_file(mountpoint).unlink(missing_ok=True)
    return True


def choose_layout(data_path: str) -> str:
    """"kernel" or "fuse" for ``--data-path`` auto|kernel|fuse (kernel where the machine allows)."""
    if data_path not in kernel.MODES:
        raise MountError(f"--data-path must be one of {', '.join(kernel.MODES)}, not {data_path!r}")
    if data_path == "fuse":
        return "fuse"
    reason = kernel.unavailable()
    if reason is None:
        return "kernel"
    if data_path == "kernel":
        raise MountError(f"--data-path kernel is not available here: {reason}")
    log.info("data path: fuse (%s)", reason)
    return "fuse"


def mount(ref: str, mountpoint: str, source: Source, cache_dir: str | None,
          log_file: str | None = None, timeout: float = 30.0, debug: bool = False,
          trace: str | None = None, profile: str = "auto", checked: bool = False,
          data_path: str = "auto", complete: bool = False, cache_size: int | None = None,
          forker=None, workload: str | None = None, manifest: bytes | None = None) -> MountState:
    """Start a detached daemon and wait until the mount answers. ``checked``: the caller has
    resolved ``ref`` to a manifest digest and verified that manifest already (lazyfs run).
    ``data_path``: auto, kernel or fuse (lazyfs.fs.kernel); ``complete``: fetch the rest of
    partly read files in the background (kernel path); ``cache_size``: the node cache's cap
    (lazyfs node --cache-size), kept by the daemon as it writes; ``forker``: the node agent's fork
    server (lazyfs.node.forker), which forks the daemon for a caller with threads; ``workload``: the
    key of the command a run starts (lazyfs.format.profile.workload_key), whose startup profile
    the mount prefetches and learns; ``manifest``: the verified bytes of the manifest ``ref``
    names, when the caller has them (the node agent): handed to the daemon, which then need not
    fetch them again."""
    mnt = os.path.realpath(mountpoint)
    clean_stale(mnt)
    if not os.path.isdir(mnt):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    if mount_entry(mnt):
        raise MountError(f"{mountpoint} is already a mountpoint (lazyfs umount {mountpoint} first)")
    with os.scandir(mnt) as it:
        if next(it, None) is not None:
            raise MountError(f"mountpoint {mountpoint} is not empty (its files would be hidden)")
    layout = choose_layout(data_path)
    if trace and layout == "kernel":
        # A trace (and the startup profile made from it) must see every read; on the kernel path
        # reads of data already on the node never reach the daemon.
        if data_path == "kernel":
            raise MountError("--trace needs every read to reach lazyfs: use --data-path fuse")
        layout = "fuse"
    digest = ref
    named_profile = profile not in ("auto", "none")
    # Fail here, in the user's terminal, not in a log file; but every manifest fetch is start-up
    # latency, so do not repeat the check a caller (lazyfs run) has made.
    if not checked or named_profile:
        reader = source.open()
        try:
            if not checked:
                digest, _ = objects.resolve_image(reader, ref)  # fail here if it is no image
            if named_profile:
                from lazyfs.records import profiles
                profiles.load(reader, digest, profile)
        finally:
            reader.close()
    cache = str(cache_dir or paths.default_cache_dir())
    logf = Path(log_file) if log_file else paths.state_dir() / "mounts" / (
        _state_file(mnt).stem + ".log")
    logf.parent.mkdir(parents=True, exist_ok=True)
    state = MountState(mnt, 0, digest, str(ref), source.describe(), cache, str(logf), layout,
                       str(paths.state_dir() / "mounts" / (_state_file(mnt).stem + ".d")))
    try:
        if manifest is not None and checked:
            _hand_over(state, manifest)
        return _start(state, source, debug, trace, profile, complete, timeout, cache_size, forker,
                      workload)
    except MountError as exc:
        if layout != "kernel" or data_path != "auto" or isinstance(exc, MetadataRefused):
            raise
        log.warning("the kernel data path failed (%s); serving %s through FUSE", exc, ref)
        state.layout = "fuse"
        return _start(state, source, debug, trace, profile, complete, timeout, cache_size, forker,
                      workload)


def _hand_over(state: MountState, manifest: bytes) -> None:
    """Leave the manifest where the daemon looks first (lazyfs.fs.kernel.Layout.manifest). Not
    made durable: it lives as long as the daemon takes to start, and the daemon verifies it."""
    path = state.kernel_layout().manifest
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, manifest, path.parent, durable=False)


def _start(state: MountState, source: Source, debug: bool, trace: str | None, profile: str,
           complete: bool, timeout: float, cache_size: int | None = None, forker=None,
           workload: str | None = None) -> MountState:
    mnt, logf = state.mountpoint, Path(state.log_file)
    read_fd, write_fd = os.pipe()
    args = DaemonArgs(state.digest, source, state.cache_dir, mnt, state.ref, write_fd, debug,
                      os.path.abspath(trace) if trace else None, profile, workload=workload,
                      layout=state.layout, runtime_dir=state.runtime_dir, complete=complete,
                      cache_size=cache_size)
    # A Ctrl-C that lands while the daemon is forked waits until its handle is known and the code
    # that abandons it is listening; otherwise the daemon would be left serving on its own.
    proc = None
    try:
        try:
            with spawn.holding_sigint():
                proc = spawn.start([sys.executable, "-m", "lazyfs.fs.daemon", *args.argv()],
                                   partial(run_daemon, args), logf, write_fd, debug, forker)
                state.pid, state.start = proc.pid, ident.proc_start(proc.pid)
        finally:
            os.close(write_fd)
        ready = spawn.wait_ready(read_fd, proc, timeout, accept=(b"1", b"K", REFUSED))
        if ready == REFUSED:  # the daemon's last log line says why, in one line
            lines = logf.read_text(errors="replace").strip().splitlines()
            raise MetadataRefused(lines[-1].partition(": ")[2] if lines else f"mount of {state.ref} refused")
        if ready is None:
            tail = logf.read_text(errors="replace").strip().splitlines()[-5:]
            raise MountError(f"mount of {state.ref} on {mnt} failed; log {logf}:\n  "
                             + "\n  ".join(tail))
        state.layout = "kernel" if ready == b"K" else "fuse"
        if state.layout == "kernel":
            kernel.mount(state.kernel_layout(), mnt)
        path = _state_file(mnt)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Renamed into place: a reader (umount, the node agent) never sees a partial file, and a
        # link left at its name is replaced, not written through. Not fsynced: no mount outlives
        # a power cut, and neither need its state.
        atomic_write(path, json.dumps(asdict(state)).encode(), path.parent, durable=False)
        return state
    except BaseException:  # a failure, or Ctrl-C at any point: no daemon or half-made mount left
        if proc is not None:
            _abandon(proc, state)
        raise
    finally:
        os.close(read_fd)


def _abandon(proc: subprocess.Popen, state: MountState) -> None:
    proc.kill()
    proc.wait()
    state.kernel_layout().manifest.unlink(missing_ok=True)  # (if it never read it)
    for path in _mounts_of(state, state.mountpoint):
        if mount_entry(path):
            _unmount(path, lazy=True)
    if state.layout == "kernel":
        shutil.rmtree(state.runtime_dir, ignore_errors=True)


def _mounts_of(state: MountState | None, mnt: str) -> list[str]:
    """Every mount of one lazyfs mount, the topmost first."""
    if state is None or state.layout != "kernel":
        return [mnt]
    lay = state.kernel_layout()
    return [mnt, str(lay.meta), str(lay.fuse)]


def _unmount(path: str, lazy: bool) -> str | None:
    """Unmount one mount; None when it is gone, else why not ("busy" when in use)."""
    entry = mount_entry(path)
    if entry is None:
        return None  # (gone already: an unmount by hand, or one cut short)
    if not entry["fstype"].startswith("fuse"):
        return None if kernel.unmount_one(path, lazy) else "target is busy"
    res = _fusermount("-u", *(["-z"] if lazy else []), path)
    if res.returncode != 0 and mount_entry(path):
        return (res.stderr or res.stdout).strip()
    return None


def umount(mountpoint: str, lazy: bool = False, timeout: float = 15.0) -> None:
    """Unmount, and wait up to ``timeout`` seconds for the daemon to exit (then SIGTERM it).
    ``lazy``: a mount in use is detached instead of refused; its daemon then goes on serving
    the files still open and exits by itself once they are closed, so it is neither waited for
    nor signalled."""
    mnt = os.path.realpath(mountpoint)
    state = read_state(mnt)
    entry = mount_entry(mnt)
    if entry is None and not is_stale(mnt):
        _state_file(mnt).unlink(missing_ok=True)
        raise MountError(f"{mountpoint} is not mounted")
    kernel_path = state is not None and state.layout == "kernel"
    if entry and entry["fstype"] != ("overlay" if kernel_path else FS_TYPE):
        raise MountError(f"{mountpoint} is a {entry['fstype']} mount, not lazyfs")
    detached = False
    for path in _mounts_of(state, mnt):
        msg = _unmount(path, lazy=False)
        if msg is not None and lazy:
            detached = detached or "busy" in msg
            msg = _unmount(path, lazy=True)
        if msg is not None:
            if "busy" in msg:
                raise MountError(f"{mountpoint} is busy (a process is using it); stop it or use --lazy")
            raise MountError(f"unmounting {mountpoint} failed: {msg}")
    if detached:
        log.info("%s: detached while in use; its daemon serves the files still open and exits "
                 "once they are closed", mountpoint)
    elif state:
        _wait_exit(state, timeout)
    _state_file(mnt).unlink(missing_ok=True)
    if kernel_path:
        shutil.rmtree(state.runtime_dir, ignore_errors=True)


def _wait_exit(state: MountState, timeout: float) -> None:
    """Wait for the mount's daemon to exit; SIGTERM it after ``timeout`` seconds. Only the
    daemon: its pid is held by a pidfd once the process is known to be it (pid and start time),
    so a pid taken by another process since is neither waited for nor signalled. A state
    written before the start time was kept names the daemon by its pid alone: then a process
    of the daemon's name is waited for, and never signalled (it could be another mount's)."""
    pid = state.pid
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, ValueError):
        return  # gone
    try:
        if not _is_daemon(state):
            return  # gone, and its pid another process's by now
        if spawn.readable(fd, timeout):  # exited
            try:
                os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)  # (our child: lazyfs run)
            except ChildProcessError:
                pass
            return
        if state.start is None:
            log.warning("daemon %d did not exit after unmount; not signalled, as its mount's state "
                        "does not say when it started", pid)
            return
        log.warning("daemon %d did not exit after unmount; sending SIGTERM", pid)
        try:
            signal.pidfd_send_signal(fd, signal.SIGTERM)
        except ProcessLookupError:
            pass
    finally:
        os.close(fd)


def _is_daemon(state: MountState) -> bool:
    """Whether the process with the daemon's pid is the daemon (or, exited, its zombie)."""
    stat = ident.proc_stat(state.pid)
    if stat is None:
        return False
    name, _, start = stat
    return start == state.start if state.start is not None else name == DAEMON_NAME.encode()

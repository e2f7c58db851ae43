"""The directory a snapshotted process lives in, and its mounts.

CRIU records files by path, so a restored process must find its root where the dumped one had it.
Every snapshot run therefore gets a fixed path, MOUNT_BASE/<id>/ (the id is recorded in the
snapshot), holding:

    image/    the lazyfs FUSE mount of the image (read-only lower layer)
    upper/    the overlay's writable layer; upper/.lazyfs/ holds the helper and the ready marker
    layer/    in a restore, the snapshot's writable layer as a read-only EROFS layer above the
              image, when the snapshot carries it so (snapshot.layer); upper/ then starts empty
    rootfs/   the overlay: the container's root (proc and a minimal dev are mounted inside)
    stdio     the process's stdout and stderr

A restore builds the same layout in a directory of its own and binds it over MOUNT_BASE/<id> in a
private mount namespace, so any number of restores of one snapshot can run side by side.

A workspace names its owner (pid and start time) in OWNERS/<id>.json, so a sweep reads only
the workspaces in use, not the empty directories restores leave at snapshots' paths. Its owner
tears it down on any end but SIGKILL; what a killed one left, the next restore or snapshot run
removes (sweep_abandoned).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

from lazyfs.errors import RunError
from lazyfs.format import snapshot as snapfmt
from lazyfs.fs import kernel, mounts
from lazyfs.proc import spawn, syscalls
from lazyfs.source.spec import Source
from lazyfs.runner import helper
from lazyfs.runner.helper import MARKER_DIR
from lazyfs.runner.overlay import Overlay

log = logging.getLogger("lazyfs.snapshot")
MOUNT_BASE = Path(snapfmt.MOUNT_ROOT)
OWNERS = MOUNT_BASE / ".owners"


class Workspace:
    def __init__(self, base: Path):
        self.base = base
        self.image = base / "image"
        self.upper = base / "upper"
        self.rootfs = base / "rootfs"
        self.stdio = base / "stdio"
        self.overlay = Overlay(self.image, self.upper, base / "work", self.rootfs)
        self.layer = base / "layer"
        self.mounted = False  # the image mounted here by this workspace
        self.layered = False  # the snapshot's writable layer mounted at layer/ (use_layer)
        self.bound = False  # a bind of someone else's mount of it (use_image)

    def claim(self) -> None:
        """Create the workspace, naming this process its owner."""
        OWNERS.mkdir(parents=True, exist_ok=True)
        self.base.mkdir(parents=True, exist_ok=True)
        spawn.write_owner(self._owner())

    def _owner(self) -> Path:
        return OWNERS / f"{self.base.name}.json"

    @classmethod
    def abandoned(cls, base: Path) -> "Workspace | None":
        """The workspace at ``base`` if its owner is gone, with what is still mounted in it (as
        the kernel says) marked for teardown; None if its owner runs, or none is named yet."""
        ws = cls(base)
        if spawn.gone_owner(ws._owner()) is None:
            return None
        ws.overlay.mounted = mounts.mount_entry(str(ws.rootfs)) is not None
        ws.layered = mounts.mount_entry(str(ws.layer)) is not None
        ws.mounted = mounts.read_state(str(ws.image)) is not None  # its own mount, with a daemon
        ws.bound = not ws.mounted and (mounts.mount_entry(str(ws.image)) is not None
                                       or mounts.is_stale(str(ws.image)))
        return ws

    def mount(self, digest: str, source: Source, cache_dir: str | None) -> None:
        self.mount_image(digest, source, cache_dir)
        self.overlay.mount()

    def mount_image(self, digest: str, source: Source, cache_dir: str | None, profile: str = "auto",
                    trace: Path | None = None) -> None:
        self.image.mkdir(parents=True, exist_ok=True)
        mounts.mount(digest, str(self.image), source, cache_dir, str(self.base / "mount.log"),
                     profile=profile, trace=str(trace) if trace else None, checked=True)
        self.mounted = True

    def use_image(self, mountpoint: str) -> None:
        """Put a mount of the image that is not this workspace's (the node agent's shared one,
        leased while the restore runs) where the snapshot's process had its own: CRIU finds
        mapped files by the path of the layer they are on (``<base>/image/usr/bin/...``), so a
        bind of it, unmounted at the end (the shared mount itself stays)."""
        self.image.mkdir(parents=True, exist_ok=True)
        kernel.mount_one(mountpoint, str(self.image), "none", syscalls.MS_BIND, None)
        self.bound = True

    def use_layer(self, image: Path) -> None:
        """The snapshot's writable layer, an EROFS image (snapshot.layer), mounted from its file
        as the topmost read-only layer; the writable layer above it starts empty."""
        why = kernel.unavailable()
        if why:
            raise RunError(f"cannot mount the snapshot's writable layer: {why}")
        self.layer.mkdir(parents=True, exist_ok=True)
        kernel.mount_one(str(image), str(self.layer), "erofs", syscalls.MS_RDONLY, None)
        self.layered = True
        self.overlay.lowers.insert(0, self.layer)

    def inject_helper(self) -> None:
        """The helper in the writable layer (part of the snapshot), written before the overlay
        is mounted (an upper layer is written directly only then)."""
        helper.install(self.upper)

    def marker(self, name: str) -> Path:
        """A marker file as the container sees it, through the overlay (so no cache hides it)."""
        return self.rootfs / MARKER_DIR / name

    def open_markers(self) -> None:
        """A snapshot run's marker directory open to whatever user the program runs as (it
        writes ``ready`` there), as /tmp is: sticky, so no one renames another's files."""
        os.chmod(self.upper / MARKER_DIR, 0o1777)

    def write_marker(self, name: str, data: str) -> None:
        """Write a marker where the container reads it, whole (a temporary name, renamed) and
        without following a link: the program may write in the marker directory (open_markers),
        so anything there may be a link it planted, and this runs as root outside the
        container, where a link would point into the host."""
        fd = os.open(self.rootfs / MARKER_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            tmp = name + ".tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=fd)  # (a link itself, never what it names)
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fd)
            with os.fdopen(out, "w") as f:
                f.write(data)
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        finally:
            os.close(fd)

    def teardown(self) -> None:
        if self.overlay.mounted:
            # proc and dev were mounted inside the root; -R takes them and the overlay down.
            res = subprocess.run(["umount", "-R", str(self.rootfs)], capture_output=True, text=True)
            if res.returncode != 0:
                subprocess.run(["umount", "-R", "-l", str(self.rootfs)], capture_output=True)
            self.overlay.mounted = False
        if self.layered:
            _let_go(kernel.unmount_one, self.layer)
            self.layered = False
        if self.mounted:
            _let_go(mounts.umount, self.image)
            self.mounted = False
        if self.bound:
            _let_go(kernel.unmount_one, self.image)
            self.bound = False

    def remove(self) -> None:
        self.teardown()
        shutil.rmtree(self.base, ignore_errors=True)
        self._owner().unlink(missing_ok=True)


def sweep_abandoned() -> int:
    """Remove the workspaces whose owner was killed with SIGKILL (it tears its own down on any
    other end): their overlays, layers and image mounts would otherwise stay for good. Returns
    how many were left because something still uses them."""
    try:
        names = [n.removesuffix(".json") for n in os.listdir(OWNERS) if n.endswith(".json")]
    except OSError:  # none yet, or not ours to read (the caller then says what it cannot do)
        return 0
    left = 0
    for name in names:
        ws = Workspace.abandoned(MOUNT_BASE / name)
        if ws is None:
            continue
        if ws.overlay.mounted:
            # Not detached: a process still in it (one the killed run left running) keeps it.
            if subprocess.run(["umount", "-R", str(ws.rootfs)], capture_output=True).returncode:
                log.warning("%s: left by a killed snapshot run or restore, still in use; trying "
                            "again next time", ws.base)
                left += 1
                continue
            ws.overlay.mounted = False
        ws.remove()
        log.warning("removed what a killed snapshot run or restore left: %s", ws.base)
    return left


def _let_go(unmount, path: Path) -> None:
    """Unmount ``path`` (lazily); a failure is logged and cleanup goes on: the caller's outcome
    matters more."""
    try:
        unmount(str(path), lazy=True)
    except Exception as exc:
        log.warning("unmounting %s: %s", path, exc)

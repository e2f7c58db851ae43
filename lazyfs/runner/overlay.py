"""A writable overlayfs layer over the read-only image mount: writes never reach the node cache.

Mounted with mount(2), not mount(8): two processes fewer on every container start."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from lazyfs.errors import MountError, RunError
from lazyfs.fs import kernel

log = logging.getLogger("lazyfs.run")


class Overlay:
    def __init__(self, lower: Path | list[Path], upper: Path, work: Path, merged: Path,
                 data_layers: str | None = None):
        """``lower``: the read-only layer, or several, the topmost first. ``data_layers``: a
        kernel-path image's own layers (lazyfs.fs.mounts.data_layers), put below ``lower`` in
        place of its read-only overlay: the container then sits on one overlay, not two."""
        self.lowers = list(lower) if isinstance(lower, list) else [lower]
        self.stacked = self.lowers  # what mount() falls back to if the data layers are refused
        self.data_layers = data_layers
        self.upper, self.work, self.merged = upper, work, merged
        self.mounted = False

    def sit_on(self, data_layers: str | None, keep: int) -> None:
        """Before mount(): replace the lower layers after the first ``keep`` by a kernel-path
        image's own layers (see __init__), if it has them."""
        if data_layers:
            self.lowers, self.data_layers = self.lowers[:keep], data_layers

    def mount(self) -> Path:
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        try:
            return self._mount()
        except RunError as exc:
            if not self.data_layers:
                raise
            # An upper filesystem without trusted xattrs (or an option this kernel refuses):
            # the read-only image overlay below works everywhere.
            log.warning("the writable layer cannot sit on the image's data layers (%s); stacking it "
                        "on the image's mount", exc)
            self.lowers, self.data_layers = self.stacked, None
            return self._mount()

    def _mount(self) -> Path:
        lowers = ":".join([*(kernel.escape(p) for p in self.lowers), *([self.data_layers] if self.data_layers else [])])
        opts = (f"lowerdir={lowers},upperdir={kernel.escape(self.upper)},workdir={kernel.escape(self.work)}")
        if self.data_layers:
            # The metadata image's files are metacopy stubs redirected into the data layers;
            # with an upper layer the kernel wants redirect_dir=on (not "follow") beside metacopy.
            opts += ",metacopy=on,redirect_dir=on"
        try:
            kernel.mount_one("overlay", str(self.merged), "overlay", 0, opts)
        except MountError as exc:
            raise RunError(f"{exc} (needs root and an upper directory on a local filesystem)") from None
        self.mounted = True
        return self.merged

    def unmount(self, detach_if_busy: bool = True) -> bool:
        """Unmount; True if it is gone. Busy means a process of the container still uses it:
        with ``detach_if_busy`` it is detached anyway (umount -l), else it stays mounted and the
        caller can stop what holds it first."""
        if not self.mounted and not os.path.ismount(self.merged):
            return True  # (asked of the kernel too: a Ctrl-C can land while mount(2) runs)
        if not kernel.unmount_one(str(self.merged)):
            if not detach_if_busy:
                return False
            kernel.unmount_one(str(self.merged), lazy=True)
        self.mounted = False
        return True

"""A writable overlayfs layer over the read-only image mount: writes never reach the node cache."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lazyfs.errors import RunError


class Overlay:
    def __init__(self, lower: Path | list[Path], upper: Path, work: Path, merged: Path):
        """``lower``: the read-only layer, or several, the topmost first."""
        self.lowers = list(lower) if isinstance(lower, list) else [lower]
        self.upper, self.work, self.merged = upper, work, merged
        self.mounted = False

    def mount(self) -> Path:
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={':'.join(map(str, self.lowers))},upperdir={self.upper},workdir={self.work}"
        res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.merged)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RunError(f"overlayfs mount on {self.merged} failed: {res.stderr.strip()} "
                           "(needs root and an upper directory on a local filesystem)")
        self.mounted = True
        return self.merged

    def unmount(self, detach_if_busy: bool = True) -> bool:
        """Unmount; True if it is gone. Busy means a process of the container still uses it:
        with ``detach_if_busy`` it is detached anyway (umount -l), else it stays mounted and the
        caller can stop what holds it first."""
        if not self.mounted and not os.path.ismount(self.merged):
            return True  # (asked of the kernel too: a Ctrl-C can land while mount(8) runs)
        res = subprocess.run(["umount", str(self.merged)], capture_output=True, text=True)
        if res.returncode != 0:
            if not detach_if_busy:
                return False
            subprocess.run(["umount", "-l", str(self.merged)], capture_output=True)
        self.mounted = False
        return True

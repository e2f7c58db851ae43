"""A writable overlayfs layer over the read-only image mount: writes never reach the node cache."""
from __future__ import annotations

import subprocess
from pathlib import Path

from lazyfs.errors import RunError


class Overlay:
    def __init__(self, lower: Path, upper: Path, work: Path, merged: Path):
        self.lower, self.upper, self.work, self.merged = lower, upper, work, merged
        self.mounted = False

    def mount(self) -> Path:
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        res = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.merged)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RunError(f"overlayfs mount on {self.merged} failed: {res.stderr.strip()} "
                           "(needs root and an upper directory on a local filesystem)")
        self.mounted = True
        return self.merged

    def unmount(self) -> None:
        if not self.mounted:
            return
        res = subprocess.run(["umount", str(self.merged)], capture_output=True, text=True)
        if res.returncode != 0:
            # Something still holds it (a stray process of the container): detach it anyway.
            subprocess.run(["umount", "-l", str(self.merged)], capture_output=True)
        self.mounted = False

"""Runs in a fresh private mount namespace (started by `unshare --mount`): binds the restore's
workspace over the path the snapshot was taken at, mounts /proc and a minimal /dev in the
container root, then execs `criu restore`. Internal to `lazyfs run --restore`."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from lazyfs.runner.nsinit import setup


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workspace", required=True)
    p.add_argument("--at", required=True, help="the snapshot's mount path")
    p.add_argument("criu", nargs="+")
    a = p.parse_args()
    os.makedirs(a.at, exist_ok=True)
    subprocess.run(["mount", "--rbind", a.workspace, a.at], check=True, capture_output=True)
    setup(os.path.join(a.at, "rootfs"), hostname=None)  # the UTS namespace comes from the dump
    sys.stdout.flush()
    os.execv(a.criu[0], a.criu)


if __name__ == "__main__":
    main()

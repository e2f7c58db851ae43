"""`lazyfs snapshotter`: containerd's proxy snapshotter (lazyfs.snapshotter, docs/containerd.md)."""
from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Optional

import typer

from lazyfs.cli import app
from lazyfs.cli.common import CacheOpt, DataPathOpt, ProfileOpt, with_source

DEFAULT_SOCKET = Path("/run/lazyfs/snapshotter.sock")
DEFAULT_ROOT = Path("/var/lib/lazyfs/snapshotter")
STOP_GRACE = 10.0  # seconds requests under way get to finish at SIGTERM


@app.command(help=(
        "Serve containerd's snapshots API on a Unix socket (root only), so that containerd, and "
        "Kubernetes through it, starts lazyfs images lazily: a layer chain the store holds (built "
        "with `lazyfs build`) is never downloaded or unpacked; containerd unpacks the others "
        "itself, logged and counted in `lazyfs node status`. The node agent keeps the mounts. "
        "Configure containerd with [proxy_plugins.lazyfs] type = \"snapshot\" and this socket as "
        "address. systemd-friendly: a ready line, sd_notify, clean SIGTERM. docs/containerd.md."))
@with_source
def snapshotter(
    socket: Path = typer.Option(DEFAULT_SOCKET, "--socket", envvar="LAZYFS_SNAPSHOTTER_SOCKET",
                                show_envvar=True, help="Unix socket containerd connects to."),
    root: Path = typer.Option(DEFAULT_ROOT, "--root", envvar="LAZYFS_SNAPSHOTTER_ROOT", show_envvar=True,
                              help="Where snapshots' directories and their metadata live."),
    cache_dir: Optional[str] = CacheOpt,
    profile: str = ProfileOpt,
    data_path: str = DataPathOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every lazy layer and mount."),
    src=None,
):
    from lazyfs.errors import SnapshotterUnavailable
    from lazyfs.node.listen import sd_notify
    from lazyfs.snapshotter.images import Images
    from lazyfs.snapshotter.service import serve
    from lazyfs.snapshotter.snapshots import Snapshotter

    if os.geteuid() != 0:
        raise SnapshotterUnavailable("the snapshotter mounts and serves root's containerd: run it as root")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    images = Images(src, cache_dir, data_path, profile)
    images.warm()
    snaps = Snapshotter(root, images)
    server = serve(snaps, socket)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"lazyfs snapshotter: serving containerd on {socket} (snapshots under {root}; images from "
          f"{src.describe()})", flush=True)
    sd_notify("READY=1")
    stop.wait()
    server.stop(STOP_GRACE).wait()
    snaps.close()
    images.close()

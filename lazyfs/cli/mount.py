"""`lazyfs mount`, `lazyfs umount`, `lazyfs stats`."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import typer

from lazyfs.cli import app
from lazyfs.cli.common import (CacheOpt, CompleteOpt, DataPathOpt, NodeOpt, ProfileOpt, err,
                               with_source)


@app.command(help="Mount an image read-only. Metadata is local after one manifest fetch (on the "
                  "kernel data path, an EROFS image shipped with the build); file blocks are "
                  "fetched on first read, verified, and kept in the node cache. Returns once the "
                  "mount answers (the daemon logs to --log-file).")
@with_source
def mount(
    ref: str = typer.Argument(..., metavar="NAME:TAG", help="Image reference or manifest digest."),
    mountpoint: str = typer.Argument(..., help="Existing empty directory."),
    cache_dir: Optional[str] = CacheOpt,
    profile: str = ProfileOpt,
    data_path: str = DataPathOpt,
    complete: bool = CompleteOpt,
    node: bool = NodeOpt,
    foreground: bool = typer.Option(False, "--foreground", "-f", help="Stay attached until "
                                    "unmounted; serves through FUSE (the kernel path's overlay is "
                                    "mounted by the detached client)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Say which data path serves."),
    log_file: Optional[str] = typer.Option(None, "--log-file", help="Daemon log (default: under "
                                           "~/.local/state/lazyfs/mounts/)."),
    debug: bool = typer.Option(False, "--debug", help="Log every FUSE request."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Append one JSON line per file read "
                                        "(path, offset, size, time) to this file."),
    src=None,  # --store, --server, ... (with_source)
):
    from lazyfs import paths
    from lazyfs.fs import daemon, mounts
    from lazyfs.records import objects

    if foreground and data_path == "kernel":
        raise typer.BadParameter("--foreground serves through FUSE; drop --data-path kernel")
    if foreground:
        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        mounts.clean_stale(mountpoint)
        reader = src.open()
        try:
            digest = objects.resolve(reader, ref)  # the daemon reads and checks the manifest
        finally:
            reader.close()
        daemon.serve(daemon.DaemonArgs(digest, src, str(cache_dir or paths.default_cache_dir()),
                                       os.path.realpath(mountpoint), ref, debug=debug,
                                       trace=os.path.abspath(trace) if trace else None,
                                       profile=profile))
        return
    if verbose:
        logging.basicConfig(level=logging.INFO, format="lazyfs: %(message)s")
    if node and not (trace or debug or log_file) and _node_enabled():
        # The image's shared mount, bound onto the mountpoint (a trace or a debug log must see
        # this mount's requests alone, so those mount on their own).
        from lazyfs.node import client
        got = client.call("bind", ref=ref, target=os.path.abspath(mountpoint), data_path=data_path,
                          profile=profile, complete=complete, **client.where(src, cache_dir))
        err.print(f"mounted {ref} ({got['digest'][:19]}) on {got['target']}: the node's shared mount "
                  f"of it (daemon pid {got['daemon_pid']})", highlight=False)
        if verbose:
            err.print("data path: " + describe_layout(got["layout"]), highlight=False)
        return
    state = mounts.mount(ref, mountpoint, src, cache_dir, log_file, debug=debug, trace=trace,
                         profile=profile, data_path=data_path, complete=complete)
    err.print(f"mounted {ref} ({state.digest[:19]}) on {state.mountpoint}; daemon pid {state.pid}, "
              f"log {state.log_file}", highlight=False)
    if verbose:
        err.print("data path: " + describe_layout(state.layout), highlight=False)


def _node_enabled() -> bool:
    from lazyfs.node import client
    return client.enabled()


def _node_target(mountpoint: str) -> str | None:
    """The node agent's shared mount behind a `lazyfs mount` made through it, if it is one."""
    from lazyfs.fs import mounts
    if mounts.read_state(mountpoint) is not None or not _node_enabled():
        return None
    from lazyfs.errors import NodeError
    from lazyfs.node import client
    try:
        answer = client.call("status", autostart=False)
    except NodeError:
        return None
    target = os.path.realpath(mountpoint)
    for image in answer["images"]:
        if any(u["target"] == target for u in image["users"]):
            return image["mountpoint"]
    return None


def describe_layout(layout: str) -> str:
    return ("kernel (EROFS metadata + overlayfs; data on local disk served by the kernel, the "
            "rest fetched through the lazyfs daemon)" if layout == "kernel"
            else "fuse (every lookup and read through the lazyfs daemon)")


@app.command(help="Unmount a lazyfs mount and wait for its daemon to exit.")
def umount(mountpoint: str = typer.Argument(...),
           lazy: bool = typer.Option(False, "--lazy", "-l", help="Detach now even if busy; the "
                                     "daemon serves the files still open and exits once they "
                                     "are closed.")):
    from lazyfs.fs import mounts

    if _node_target(mountpoint) is not None:
        from lazyfs.errors import MountError
        from lazyfs.node import client
        # Resolved here, as _node_target matched it: the agent would resolve it in its own
        # working directory, not this command's.
        answer = client.call("unbind", target=os.path.realpath(mountpoint), lazy=lazy, autostart=False)
        if answer.get("known") is False:
            raise MountError(f"{mountpoint}: the node agent holds no mount there")
        return
    mounts.umount(mountpoint, lazy=lazy)


@app.command(help="Print a mount's counters (blocks fetched, bytes, cache hits, FUSE requests) "
                  "as JSON.")
def stats(mountpoint: str = typer.Argument(...)):
    from lazyfs.fs import control

    print(json.dumps(control.query(_node_target(mountpoint) or mountpoint), indent=2))

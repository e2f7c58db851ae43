"""`lazyfs mount`, `lazyfs umount`, `lazyfs stats`."""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

import typer

from lazyfs.cli import app
from lazyfs.cli.common import (CacheOpt, CompleteOpt, DataPathOpt, DeadlineOpt, HedgeOpt, ProfileOpt,
                               ReadaheadOpt, ServerOpt, SiblingsOpt, StoreOpt, err, source)


@app.command(help="Mount an image read-only. Metadata is local after one manifest fetch; file "
                  "blocks are fetched on first read, verified, and kept in the node cache. Returns "
                  "once the mount answers (the daemon logs to --log-file).")
def mount(
    ref: str = typer.Argument(..., metavar="NAME:TAG", help="Image reference or manifest digest."),
    mountpoint: str = typer.Argument(..., help="Existing empty directory."),
    store: Optional[str] = StoreOpt,
    server: Optional[List[str]] = ServerOpt,
    cache_dir: Optional[str] = CacheOpt,
    deadline: str = DeadlineOpt,
    hedge_after: str = HedgeOpt,
    readahead: int = ReadaheadOpt,
    siblings: bool = SiblingsOpt,
    profile: str = ProfileOpt,
    data_path: str = DataPathOpt,
    complete: bool = CompleteOpt,
    foreground: bool = typer.Option(False, "--foreground", "-f", help="Stay attached until "
                                    "unmounted; serves through FUSE (the kernel path's overlay is "
                                    "mounted by the detached client)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Say which data path serves."),
    log_file: Optional[str] = typer.Option(None, "--log-file", help="Daemon log (default: under "
                                           "~/.local/state/lazyfs/mounts/)."),
    debug: bool = typer.Option(False, "--debug", help="Log every FUSE request."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Append one JSON line per file read "
                                        "(path, offset, size, time) to this file."),
):
    from lazyfs import paths
    from lazyfs.fs import daemon, mounts
    from lazyfs.store import objects

    if foreground and data_path == "kernel":
        raise typer.BadParameter("--foreground serves through FUSE; drop --data-path kernel")
    src = source(store, server, deadline, hedge_after, readahead, siblings)
    if foreground:
        logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        mounts.clean_stale(mountpoint)
        reader = src.open()
        digest = objects.resolve(reader, ref)
        reader.close()
        daemon.serve(daemon.DaemonArgs(digest, src, str(cache_dir or paths.default_cache_dir()),
                                       os.path.realpath(mountpoint), ref, debug=debug,
                                       trace=os.path.abspath(trace) if trace else None,
                                       profile=profile))
        return
    if verbose:
        logging.basicConfig(level=logging.INFO, format="lazyfs: %(message)s")
    state = mounts.mount(ref, mountpoint, src, cache_dir, log_file, debug=debug, trace=trace,
                         profile=profile, data_path=data_path, complete=complete)
    err.print(f"mounted {ref} ({state.digest[:19]}) on {state.mountpoint}; daemon pid {state.pid}, "
              f"log {state.log_file}", highlight=False)
    if verbose:
        err.print("data path: " + describe_layout(state.layout), highlight=False)


def describe_layout(layout: str) -> str:
    return ("kernel (EROFS metadata + overlayfs; data on local disk served by the kernel, the "
            "rest fetched through the lazyfs daemon)" if layout == "kernel"
            else "fuse (every lookup and read through the lazyfs daemon)")


@app.command(help="Unmount a lazyfs mount and wait for its daemon to exit.")
def umount(mountpoint: str = typer.Argument(...),
           lazy: bool = typer.Option(False, "--lazy", "-l", help="Detach now even if busy.")):
    from lazyfs.fs import mounts

    mounts.umount(mountpoint, lazy=lazy)


@app.command(help="Print a mount's counters (blocks fetched, bytes, cache hits, FUSE requests) "
                  "as JSON.")
def stats(mountpoint: str = typer.Argument(...)):
    from lazyfs.fs import control

    print(json.dumps(control.query(mountpoint), indent=2))

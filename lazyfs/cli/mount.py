"""`lazyfs mount`, `lazyfs umount`, `lazyfs stats`."""
from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

import typer

from lazyfs.cli import app
from lazyfs.cli.common import (CacheOpt, DeadlineOpt, HedgeOpt, ProfileOpt, ReadaheadOpt, ServerOpt,
                               SiblingsOpt, StoreOpt, err, source)


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
    foreground: bool = typer.Option(False, "--foreground", "-f", help="Stay attached until unmounted."),
    log_file: Optional[str] = typer.Option(None, "--log-file", help="Daemon log (default: under "
                                           "~/.local/state/lazyfs/mounts/)."),
    debug: bool = typer.Option(False, "--debug", help="Log every FUSE request."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Append one JSON line per file read "
                                        "(path, offset, size, time) to this file."),
):
    from lazyfs import paths
    from lazyfs.fs import daemon, mounts
    from lazyfs.store import objects

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
    state = mounts.mount(ref, mountpoint, src, cache_dir, log_file, debug=debug, trace=trace,
                         profile=profile)
    err.print(f"mounted {ref} ({state.digest[:19]}) on {state.mountpoint}; daemon pid {state.pid}, "
              f"log {state.log_file}", highlight=False)


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

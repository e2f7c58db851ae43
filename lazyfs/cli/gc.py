"""`lazyfs gc`."""
from __future__ import annotations

import json
from typing import Optional

import click
import typer

from lazyfs.cli import app
from lazyfs.cli.common import CacheOpt, StoreOpt, err, given, human, parse_duration, parse_size


@app.command(help="Remove what no tag needs any more. On a store: blocks and manifests no tag "
                  "reaches and older than --grace (never while a build runs). With --node-cache: "
                  "trim a node cache to --max-size, least recently used blocks first (safe beside "
                  "running mounts). --dry-run reports what would go.")
def gc(
    store: Optional[str] = StoreOpt,
    grace: str = typer.Option("1h", "--grace", help="Spare unreferenced objects younger than "
                              "this (e.g. 30m, 1h, 7d). Store gc only."),
    node_cache: bool = typer.Option(False, "--node-cache", help="Trim a node cache instead of a store."),
    cache_dir: Optional[str] = CacheOpt,
    max_size: Optional[str] = typer.Option(None, "--max-size", help="With --node-cache: the size to "
                                           "trim it to (e.g. 20G)."),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Change nothing (no lease taken, "
                                 "no store created); say what would go."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    from lazyfs.cache import cap
    from lazyfs.records import gc as collector
    from lazyfs import paths
    from lazyfs.store import open_store
    from lazyfs.store.local import LocalStore

    verb = "would remove" if dry_run else "removed"
    # One gc or the other: an option of the other kind would be dropped without a word (and a
    # --max-size meant for a cache would have the default store collected instead).
    if node_cache:
        if given(click.get_current_context(), {"store": "--store", "grace": "--grace"}):
            raise typer.BadParameter("--store and --grace are for a store's gc, not with --node-cache")
        if max_size is None:
            raise typer.BadParameter("--node-cache needs --max-size")
        limit = parse_size(max_size)
        root = cache_dir or str(paths.default_cache_dir())
        r = cap.collect(root, limit, dry_run)
        if as_json:
            print(json.dumps(r.to_dict(), indent=2))
            return
        err.print(f"node cache {root}: {r.files} blocks, {human(r.bytes_before)}; {verb} {r.evicted} "
                  f"({human(r.evicted_bytes)})", highlight=False)
        return
    if max_size is not None or cache_dir is not None:
        raise typer.BadParameter("--max-size and --cache-dir trim a node cache: add --node-cache")
    spared = parse_duration(grace)
    opened = open_store(store)
    if isinstance(opened, LocalStore) and not opened.initialised():  # (a typo: never a new store)
        raise typer.BadParameter(f"no lazyfs store at {opened.root}")
    opened.check(write=not dry_run)
    r = collector.collect_store(opened, spared, dry_run)
    if as_json:
        print(json.dumps(r.to_dict(), indent=2))
        return
    err.print(f"live: {r.live_manifests} manifests, {r.live_blocks} blocks; {verb} "
              f"{len(r.manifests)} manifests and {len(r.blocks)} blocks ({human(r.bytes)}); "
              f"{r.spared_young} unreferenced but younger than {grace} kept", highlight=False)

"""`lazyfs profile`."""
from __future__ import annotations

import json
from typing import List, Optional

import typer

from lazyfs.cli import app
from lazyfs.cli.common import (CacheOpt, CommandLineCommand, EnvOpt, NetworkOpt, RuntimeOpt,
                               UserOpt, WorkdirOpt, err, human, parse_duration, sayer, with_source)


@app.command(cls=CommandLineCommand, context_settings={"allow_interspersed_args": False},
             help="Record a startup profile: run CMD once in a container on the image, note which "
                  "blocks it reads first and in what order, and publish that with the image (to "
                  "--store). Later mounts and runs of the image fetch those blocks ahead of the "
                  "workload, in batches, while its own reads still go first. Options go before "
                  "NAME:TAG, or between it and the -- that starts the command. Example: "
                  "lazyfs profile torch:latest -- python3 -c 'import torch'")
@with_source
def profile(
    ref: str = typer.Argument(..., metavar="NAME:TAG"),
    cmd: Optional[List[str]] = typer.Argument(None, metavar="[-- CMD ARGS...]"),
    cache_dir: Optional[str] = CacheOpt,
    runtime: str = RuntimeOpt,
    env: Optional[List[str]] = EnvOpt,
    workdir: Optional[str] = WorkdirOpt,
    user: Optional[str] = UserOpt,
    network: str = NetworkOpt,
    duration: Optional[str] = typer.Option(None, "--duration", help="Record for this long, then "
                                           "stop the workload (for servers, which never exit); "
                                           "without it, record until the command exits 0."),
    publish: bool = typer.Option(True, "--publish/--no-publish", help="Publish to --store (default) "
                                 "or only print/write it."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Also write the profile as "
                                         "JSON to this file."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Say what ran, and what it read."),
    src=None,  # --store, --server, ... (with_source)
):
    from lazyfs.runner.profile_run import record
    from lazyfs.runner.session import RunOptions
    from lazyfs.store import open_store

    argv = list(cmd or [])
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if publish and src.servers and not src.store:
        raise typer.BadParameter("publishing needs a writable --store (the origin) besides --server")
    opts = RunOptions(ref, argv, src, cache_dir, runtime, None, list(env or []), workdir, user,
                      network, stop_after=parse_duration(duration) if duration else None)
    say = sayer(verbose)
    target = open_store(src.store) if publish else None
    digest, prof = record(opts, target, say)
    if output:
        with open(output, "w") as f:
            json.dump({"image": prof.image, "meta": prof.meta,
                       "blocks": [[b.digest, b.size, b.t] for b in prof.blocks]}, f, indent=1)
    where = f"published as {digest[:19]} to {target.url}" if digest else "not published"
    err.print(f"profile of {ref}: {len(prof.blocks)} blocks ({human(prof.bytes)}) touched by a "
              f"workload that read {human(prof.meta['read_bytes'])} in {prof.meta['reads']} reads; "
              f"{where}", highlight=False)
    if digest:
        print(digest)

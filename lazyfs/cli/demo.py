"""`lazyfs demo`."""
from __future__ import annotations

from typing import Optional

import typer

from lazyfs.cli import app
from lazyfs.cli.common import RichProgress, StoreOpt


@app.command(help="Build a small real image on the embedded store, run a command in it from an "
                  "empty node cache, and print how many bytes of the image the start fetched.")
def demo(store: Optional[str] = StoreOpt,
         runtime: str = typer.Option("auto", "--runtime", help="auto, podman or namespaces.")):
    from lazyfs.demo import run_demo

    with RichProgress() as progress:
        code = run_demo(store, runtime, lambda m: print(m, flush=True), progress)
    raise typer.Exit(code)

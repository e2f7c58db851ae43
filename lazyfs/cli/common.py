"""Options and output helpers shared by the command modules."""
from __future__ import annotations

import sys
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn, TransferSpeedColumn)

STORE_HELP = ("Block store: a directory (or file://PATH), s3://BUCKET/PREFIX (AWS_* settings as "
              "for boto3), or a cache server http://HOST:PORT ($LAZYFS_TOKEN for writes). "
              "Default: $LAZYFS_STORE, else the per-user store (~/.local/share/lazyfs/store).")
StoreOpt = typer.Option(None, "--store", "-s", help=STORE_HELP, metavar="STORE")
CacheOpt = typer.Option(None, "--cache-dir", help="Node-local block cache shared by all images. "
                        "Default: $LAZYFS_CACHE_DIR, else ~/.cache/lazyfs/node-cache.", metavar="DIR")
ServerOpt = typer.Option(None, "--server", metavar="URL", help="A lazyfs cache server (repeat for a "
                         "fleet: blocks are sharded by rendezvous hashing, with failover and hedging). "
                         "With --server, --store names the origin to fall back to (optional). "
                         "$LAZYFS_TOKEN or $LAZYFS_TOKEN_FILE for servers that want a token.")
DeadlineOpt = typer.Option("30s", "--deadline", help="A block read that gets no good answer in this "
                           "long fails with EIO (and a log line) instead of hanging.")
HedgeOpt = typer.Option("500ms", "--hedge-after", help="When a server has not answered after this "
                        "long (or 2x the recent p90, if larger), ask the next server's cache too; "
                        "after 4x, let it fetch from the origin. The first good answer wins.")
ReadaheadOpt = typer.Option(4, "--readahead", min=0, help="While a file is read sequentially, "
                            "how many of its next blocks to fetch in parallel in the background "
                            "(0: off).")
SiblingsOpt = typer.Option(True, "--siblings/--no-siblings", help="When a directory's first small "
                           "file is read, fetch its other small files (up to 128 files, 8 MiB) in one "
                           "batch: an import reads a package's modules one after another.")
ProfileOpt = typer.Option("auto", "--profile", metavar="auto|none|REF", help="Startup profile to "
                          "prefetch (see `lazyfs profile`): auto (the image's own, if published), "
                          "none, a profile digest, or an image NAME:TAG whose profile to use.")
RuntimeOpt = typer.Option("auto", "--runtime", help="auto (podman if present, else namespaces), "
                          "podman, or namespaces.")
EnvOpt = typer.Option(None, "--env", "-e", help="KEY=VALUE, repeatable.")
WorkdirOpt = typer.Option(None, "--workdir", "-w", help="Working directory inside the container "
                          "(default: the image's WorkingDir, else /).")
UserOpt = typer.Option(None, "--user", "-u", help="USER[:GROUP] inside the image.")
NetworkOpt = typer.Option("none", "--network", help="none (default) or host.")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")

err = Console(stderr=True, soft_wrap=True)  # messages are lines, not paragraphs
out = Console()


class RichProgress:
    """Byte/item progress bars on a terminal; silent when stderr is not a TTY (logs, CI)."""

    def __init__(self, counting: str | None = None) -> None:
        """counting: None for byte transfers, else the word for what is counted ("runs")."""
        self.enabled = sys.stderr.isatty()
        self.counting = counting
        self.progress: Optional[Progress] = None

    def __enter__(self):
        if self.enabled:
            amount = ((DownloadColumn(), TransferSpeedColumn()) if self.counting is None else
                      (MofNCompleteColumn(), TextColumn(self.counting), TimeElapsedColumn()))
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), *amount,
                                     TimeRemainingColumn(), console=err, transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.__exit__(*exc)

    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        if not self.progress:
            return lambda n: None
        tid = self.progress.add_task(description, total=total)
        return lambda n: self.progress.advance(tid, n)


def sayer(verbose: bool) -> Callable[[str], None]:
    """What --verbose commands use to report progress: a "lazyfs: " line on stderr, or nothing."""
    if not verbose:
        return lambda msg: None
    return lambda msg: err.print(f"lazyfs: {msg}", highlight=False, markup=False)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'512k', '64G', '1.5g' or plain bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)] if unit else t)
    except ValueError:
        raise typer.BadParameter(f"not a size: {text!r} (use e.g. 512k, 64G)") from None
    if value < 0:
        raise typer.BadParameter("a size cannot be negative")
    return int(value * _UNITS[unit])


_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def source(store: Optional[str], servers: Optional[list[str]], deadline: str = "30s",
           hedge_after: str = "500ms", readahead: int = 4, siblings: bool = True):
    """The --store/--server/... options of mount and run, as a lazyfs.remote.source.Source."""
    from lazyfs.remote.source import Source
    dl = parse_duration(deadline)
    if dl <= 0:
        raise typer.BadParameter("--deadline must be positive")
    return Source(store, tuple(servers or ()), dl, parse_duration(hedge_after), readahead, siblings)


def parse_duration(text: str) -> float:
    """'250ms', '90s', '30m', '1h', '7d', or plain seconds."""
    t = text.strip().lower()
    if t.endswith("ms"):
        return parse_duration(t[:-2]) / 1000
    unit = t[-1:] if t[-1:] in _SECONDS else "s"
    try:
        value = float(t[:-1] if t[-1:] in _SECONDS else t)
    except ValueError:
        raise typer.BadParameter(f"not a duration: {text!r} (use e.g. 30m, 1h, 7d)") from None
    if value < 0:
        raise typer.BadParameter("a duration cannot be negative")
    return value * _SECONDS[unit]

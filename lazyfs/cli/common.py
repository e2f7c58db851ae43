"""Options and output helpers shared by the command modules."""
from __future__ import annotations

import functools
import os
import inspect
import sys
import typing
from typing import Callable, List, Optional

import click
import typer

from lazyfs.source import defaults

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
DeadlineOpt = typer.Option(defaults.duration(defaults.DEADLINE), "--deadline",
                           help="A block read that gets no good answer in this "
                           "long fails with EIO (and a log line) instead of hanging.")
HedgeOpt = typer.Option(defaults.duration(defaults.HEDGE_AFTER), "--hedge-after",
                        help="When a server has not answered after this "
                        "long (or 2x the recent p90, if larger), ask the next server's cache too; "
                        "after 4x, let it fetch from the origin. The first good answer wins.")
ReadaheadOpt = typer.Option(defaults.READAHEAD, "--readahead", min=0,
                            help="How many of a file's next blocks to fetch in the background "
                            "along with a read: in parallel while the file is read sequentially, "
                            "and in one batch after a read anywhere in it had to wait for the "
                            "network (an mmapped library's page faults). 0: off.")
SiblingsOpt = typer.Option(defaults.SIBLINGS, "--siblings/--no-siblings",
                           help="When a directory's first small "
                           "file is read, fetch its other small files (up to 128 files, 8 MiB) in one "
                           "batch: an import reads a package's modules one after another.")
ProfileOpt = typer.Option("auto", "--profile", metavar="auto|none|REF", help="Startup profile to "
                          "prefetch: auto (the one the fleet learnt for this image and command, "
                          "else the image's own from `lazyfs profile`; a run through cache servers "
                          "also learns and contributes its own), none (neither prefetch nor learn), "
                          "a profile digest, or an image NAME:TAG whose profile to use.")
DataPathOpt = typer.Option("auto", "--data-path", metavar="auto|kernel|fuse", envvar="LAZYFS_DATA_PATH",
                           show_envvar=True, help="Who serves "
                           "the image: kernel (EROFS metadata + overlayfs; only missing data goes "
                           "through the lazyfs daemon), fuse (every request through the daemon), or "
                           "auto (kernel where it is available: root, EROFS, Linux 6.12+).")
NodeOpt = typer.Option(True, "--node/--no-node", help="Share the image's mount with the node's "
                       "other users through the node agent (`lazyfs node`, started on first use; "
                       "LAZYFS_NODE=off turns it off); --no-node mounts for this command alone.")
CompleteOpt = typer.Option(False, "--complete/--no-complete", help="Kernel path: after the start, "
                           f"when reads have been quiet for {defaults.COMPLETE_IDLE:g} s, fetch the "
                           "rest of every file the start read part of, so the next mount serves it "
                           "from the kernel.")
RuntimeOpt = typer.Option("auto", "--runtime", help="auto (podman if present, else namespaces), "
                          "podman, or namespaces.")
def _env(values: list[str] | None) -> list[str] | None:
    """KEY=VALUE as given; a bare KEY takes this shell's value, and is left out where this shell
    has none (docker's and podman's -e KEY)."""
    out = []
    for kv in values or ():
        name, eq, _ = kv.partition("=")
        if not name or "\0" in kv:
            raise typer.BadParameter(f"{kv!r}: KEY=VALUE, or KEY to pass this shell's value on")
        if eq:
            out.append(kv)
        elif name in os.environ:
            out.append(f"{name}={os.environ[name]}")
    return out if values else values


def _workdir(value: str | None) -> str | None:
    if value and not value.startswith("/"):  # ("" leaves the image's)
        raise typer.BadParameter(f"{value!r}: the working directory must be an absolute path")
    return value


def _user(value: str | None) -> str | None:
    if value:  # ("" runs as root, whatever the image's User)
        name, _, group = value.partition(":")
        if not name or ":" in group or "\0" in value:
            raise typer.BadParameter(f"{value!r}: USER[:GROUP], each a name or a number")
    return value


EnvOpt = typer.Option(None, "--env", "-e", callback=_env, help="KEY=VALUE, repeatable; a bare KEY "
                      "passes this shell's value (left out if it has none).")
WorkdirOpt = typer.Option(None, "--workdir", "-w", callback=_workdir, help="Working directory "
                          "inside the container, absolute (default: the image's WorkingDir, else "
                          "/); the namespaces runtime makes it if the image lacks it, podman refuses.")
UserOpt = typer.Option(None, "--user", "-u", callback=_user, help="USER[:GROUP] inside the image, "
                       "names or numbers.")
def _network(value: str) -> str:
    from lazyfs.runner.runtime import NETWORKS
    if value not in NETWORKS:
        raise typer.BadParameter(f"{value!r}: none (a network of its own, empty) or host (the host's)")
    return value


NetworkOpt = typer.Option("none", "--network", callback=_network, metavar="none|host",
                          help="none (default: a network namespace of its own, with no interface "
                          "but loopback) or host (the host's network).")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")

class CommandLineCommand(typer.core.TyperCommand):
    """A command of the form ``lazyfs CMD [OPTIONS] NAME:TAG [-- COMMAND ARGS...]``.

    Two habits meet here: docker's (options before the image; everything after it is the
    command) and ``lazyfs run NAME:TAG --store DIR -- CMD`` (options after the image, the command
    after ``--``). When the image is followed by an option and a ``--`` comes later, what stands
    between them is parsed as lazyfs options; otherwise everything after the image stays the
    command, so ``lazyfs run img grep -- -x file`` still runs grep with its own ``--``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            moved = options_after_image(self.get_params(ctx), list(args))
        except click.UsageError as exc:
            exc.ctx = exc.ctx or ctx  # (its message names the command)
            raise
        return super().parse_args(ctx, moved)


def options_after_image(params, args: list[str]) -> list[str]:
    """``args`` with options given between NAME:TAG and ``--`` moved before NAME:TAG."""
    takes_value = {}
    for p in params:
        if isinstance(p, click.Option):
            takes_value.update({n: not (p.is_flag or p.count) for n in p.opts})
            takes_value.update({n: False for n in p.secondary_opts})

    def skip_options(seq: list[str]) -> int:
        """Index of the first positional argument (or "--") in seq."""
        i = 0
        while i < len(seq) and seq[i] != "--" and seq[i].startswith("-") and len(seq[i]) > 1:
            name, needs_next = value_option(seq[i])
            if name not in takes_value:
                raise click.NoSuchOption(name)
            if needs_next:
                if i + 1 >= len(seq) or seq[i + 1] == "--":
                    raise click.UsageError(f"option {name} needs a value")
                i += 1
            i += 1
        return i

    def value_option(a: str) -> tuple[str, bool]:
        """(the option, whether its value is the next argument), as click reads ``--name[=V]``
        and clusters of short options (``-vs DIR``: the first that takes a value ends it)."""
        if a.startswith("--"):
            name = a.split("=", 1)[0]
            return name, "=" not in a and takes_value.get(name, False)
        for k in range(1, len(a)):
            name = "-" + a[k]
            if name not in takes_value or takes_value[name]:
                return name, takes_value.get(name, False) and k == len(a) - 1
        return a[:2], False

    image = skip_options(args)
    if image >= len(args) or args[image] == "--":
        return args
    after = args[image + 1:]
    if not after or after[0] == "--" or not after[0].startswith("-") or "--" not in after:
        return args
    end = after.index("--")
    stray = skip_options(after[:end])
    if stray < end:
        raise click.UsageError(f"unexpected argument {after[stray]!r} between {args[image]} and "
                               "--: lazyfs options go there, the command goes after --")
    return args[:image] + after[:end] + [args[image]] + after[end:]


class LazyConsole:
    """A rich Console made on first use: importing rich costs ~0.1 s, which every `lazyfs run`
    would otherwise pay before its container starts."""

    def __init__(self, **kwargs) -> None:
        self._kwargs, self._console = kwargs, None

    def console(self):
        if self._console is None:
            from rich.console import Console
            self._console = Console(**self._kwargs)
        return self._console

    def __getattr__(self, name: str):
        return getattr(self.console(), name)


err = LazyConsole(stderr=True, soft_wrap=True)  # messages are lines, not paragraphs
out = LazyConsole()


class RichProgress:
    """Byte/item progress bars on a terminal; silent when stderr is not a TTY (logs, CI)."""

    def __init__(self, counting: str | None = None) -> None:
        """counting: None for byte transfers, else the word for what is counted ("runs")."""
        self.enabled = sys.stderr.isatty()
        self.counting = counting
        self.progress = None  # a rich Progress once started

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)
            amount = ((DownloadColumn(), TransferSpeedColumn()) if self.counting is None else
                      (MofNCompleteColumn(), TextColumn(self.counting), TimeElapsedColumn()))
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), *amount,
                                     TimeRemainingColumn(), console=err.console(), transient=True)
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
    """What --verbose commands use to report progress: a "lazyfs: " line on stderr, or nothing.
    Written as it is, not through rich: these lines fall on a run's start path (the first is
    "mounted", before the container starts), and rich's first print costs 70-90 ms on a cold
    page cache, measured in `lazyfs bench`."""
    if not verbose:
        return lambda msg: None

    def say(msg: str) -> None:
        sys.stderr.write(f"lazyfs: {msg}\n")
        sys.stderr.flush()
    return say


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


def parse_bool(option: str, text: str) -> bool:
    """``--tls-verify=false`` and friends, spelled as podman and skopeo accept them."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise typer.BadParameter(f"{option} takes true or false, not {text!r}")


_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def source(store: Optional[str], servers: Optional[list[str]], deadline: str, hedge_after: str,
           readahead: int, siblings: bool):
    """The --store/--server/... options, as a lazyfs.source.spec.Source."""
    from lazyfs.source.spec import Source
    dl = parse_duration(deadline)
    if dl <= 0:
        raise typer.BadParameter("--deadline must be positive")
    return Source(store, tuple(servers or ()), dl, parse_duration(hedge_after), readahead, siblings)


# Where an image is read from: the options of every command that mounts one, declared here once.
SOURCE_OPTIONS = (("store", Optional[str], StoreOpt), ("server", Optional[List[str]], ServerOpt),
                  ("deadline", str, DeadlineOpt), ("hedge_after", str, HedgeOpt),
                  ("readahead", int, ReadaheadOpt), ("siblings", bool, SiblingsOpt))


def with_source(command: Callable) -> Callable:
    """Give a typer command the SOURCE_OPTIONS, right after its arguments, and hand them to it as
    one ``src`` parameter (a Source)."""
    sig = inspect.signature(command)
    hints = typing.get_type_hints(command)
    own = [p.replace(annotation=hints.get(p.name, p.annotation))
           for p in sig.parameters.values() if p.name != "src"]
    args = [p for p in own if isinstance(p.default, typer.models.ArgumentInfo)]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind)
             for name, kind, opt in SOURCE_OPTIONS]
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in args]
    args = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in args]

    @functools.wraps(command)
    def wrapper(**kwargs):
        given = [kwargs.pop(name) for name, _, _ in SOURCE_OPTIONS]
        return command(src=source(*given), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*args, *added, *rest])
    wrapper.__annotations__ = {p.name: p.annotation for p in wrapper.__signature__.parameters.values()}
    del wrapper.__wrapped__  # typer must see this signature, not the command's
    return wrapper


def given(ctx: click.Context, options: dict[str, str]) -> str:
    """The flags (``options``: parameter name -> flag) the user gave on the command line, joined:
    for refusing options that would do nothing where they were given, rather than drop them."""
    from click.core import ParameterSource
    return ", ".join(flag for name, flag in options.items()
                     if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE)


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

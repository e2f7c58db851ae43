"""The `lazyfs` command: one root typer app, one thin module per command group."""
from __future__ import annotations

import sys

import typer

from lazyfs.errors import LazyfsError

app = typer.Typer(
    name="lazyfs", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Lazily loaded container images: build an image into content-addressed blocks, mount it "
         "so that only what is read is fetched (the kernel serves metadata and data already on the "
         "node; a FUSE daemon fetches and verifies the rest), and run containers on it.")


# Which module defines each command: a container start imports only what it runs (every
# millisecond of `lazyfs run` is start-up latency), help and unknown commands import them all.
MODULES = {"bench": "bench", "build": "build", "images": "build", "inspect": "build", "demo": "demo",
           "gc": "gc", "mount": "mount", "node": "node", "umount": "mount", "stats": "mount", "profile": "profile",
           "run": "run", "serve": "serve", "snapshots": "snapshots", "snapshotter": "snapshotter",
           "snapshot-helper": "snapshots"}


# Boolean options podman spells with an optional value: bare `--tls-verify` means true, and
# `--tls-verify=false` turns it off. Click options take a value or none, never either. Only the
# commands that have the option: elsewhere it is a container's command's own (`lazyfs run IMAGE
# skopeo inspect --tls-verify ...`), never to be rewritten.
OPTIONAL_TRUE = {"build": ("--tls-verify",)}


def _optional_values(argv: list[str]) -> list[str]:
    options = OPTIONAL_TRUE.get(argv[1] if len(argv) > 1 else "", ())
    end = argv.index("--") if "--" in argv else len(argv)
    return [f"{a}=true" if a in options and i < end else a for i, a in enumerate(argv)]


@app.callback()
def _group() -> None:
    """Keeps `lazyfs COMMAND` a command group even when only one command module is loaded."""


def _register(argv: list[str] | None = None) -> None:
    import importlib
    name = MODULES.get((argv or sys.argv)[1] if len(argv or sys.argv) > 1 else "")
    for module in [name] if name else sorted(set(MODULES.values())):
        importlib.import_module(f"lazyfs.cli.{module}")


def deferred_imports() -> list[str]:
    """What the registered command modules import only when a command gets that far (their
    ``PRELOAD``): the node agent's zygote imports them ahead, so its forked runs need not."""
    return [name for module in list(sys.modules.values())
            if getattr(module, "__name__", "").startswith("lazyfs.cli.")
            for name in getattr(module, "PRELOAD", ())]


# The click command typer builds from `app` (10 ms a time): built once by the node agent's zygote,
# whose forked runs then start parsing at once (lazyfs.node.zygote.preload).
prebuilt = None


def _usage_error(exc) -> None:
    """A usage error as one line, like every other lazyfs error (typer would draw a box):
    `lazyfs gc: error: Invalid value: ... (see `lazyfs gc --help`)`."""
    import click
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "lazyfs"
    hint = f" (see `{where} --help`)" if isinstance(exc, click.UsageError) else ""
    print(f"{where}: error: {exc.format_message()}{hint}", file=sys.stderr)


def main() -> None:
    import click
    import typer.main
    sys.argv = _optional_values(sys.argv)
    _register()
    command = prebuilt if prebuilt is not None else typer.main.get_command(app)
    try:
        # Not standalone: click's errors come here, to be said in one line (typer would draw a
        # box, importing rich for it); an exit code (typer.Exit, --help) comes back as the value.
        code = command.main(prog_name="lazyfs", standalone_mode=False)
    except click.ClickException as exc:
        _usage_error(exc)
        sys.exit(exc.exit_code)
    except click.Abort:
        print("lazyfs: interrupted", file=sys.stderr)
        sys.exit(130)
    except LazyfsError as exc:
        print(f"lazyfs: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:  # an I/O failure no layer turned into a LazyfsError: still one line
        print(f"lazyfs: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("lazyfs: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)

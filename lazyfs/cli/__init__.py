"""The `lazyfs` command: one root typer app, one thin module per command group."""
from __future__ import annotations

import sys

import typer

from lazyfs.errors import LazyfsError

app = typer.Typer(
    name="lazyfs", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Lazily loaded container images: build an image into content-addressed blocks, mount it "
         "with FUSE fetching blocks on first read, and run containers on it.")


def _register() -> None:
    from lazyfs.cli import bench, build, demo, gc, mount, profile, run, serve, snapshots  # noqa: F401


def main() -> None:
    _register()
    try:
        app()
    except LazyfsError as exc:
        print(f"lazyfs: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:  # an I/O failure no layer turned into a LazyfsError: still one line
        print(f"lazyfs: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("lazyfs: interrupted", file=sys.stderr)
        sys.exit(130)

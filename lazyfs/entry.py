"""The `lazyfs` command's entry point.

`lazyfs run` first offers itself to the node agent (lazyfs.node.fastrun): the agent starts it from
a process that has all of lazyfs imported already, which saves the interpreter most of its start
(importing the CLI alone costs about a quarter of a second). Everything else, and a run the agent
cannot take, goes to the typer CLI as usual.
"""
from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        from lazyfs.node import fastrun  # the standard library only
        code = fastrun.try_run(sys.argv[1:])
        if code is not None:
            sys.exit(code)
    from lazyfs.cli import main as cli_main
    cli_main()


if __name__ == "__main__":
    main()

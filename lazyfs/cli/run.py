"""`lazyfs run`."""
from __future__ import annotations

import json
import signal
import sys
from typing import List, Optional

import typer

from lazyfs.cli import app
from lazyfs.cli.common import (CacheOpt, CommandLineCommand, CompleteOpt, DataPathOpt, EnvOpt,
                               NetworkOpt, NodeOpt, ProfileOpt, RuntimeOpt, UserOpt, WorkdirOpt, given,
                               RichProgress, parse_duration, sayer, with_source)
from lazyfs.proc import spawn

# What `lazyfs run --snapshot/--restore` imports when it gets there: the node's fork server
# imports it ahead (lazyfs.node.zygote), so a restore forked from it does not spend ~200 ms
# importing the snapshot code (and the page server, a fork of it, none either).
PRELOAD = ("snapshot.restore", "snapshot.capture", "snapshot.lazyserver", "snapshot.lazypages")


@app.command(cls=CommandLineCommand, context_settings={"allow_interspersed_args": False},
             help="Run a command in a container on a lazily mounted image, with a writable overlay "
                  "on top; exits with the command's exit code. Without CMD, the image's "
                  "Entrypoint/Cmd run. Options go before NAME:TAG, or between it and the -- "
                  "that starts the command; without --, all after NAME:TAG is the command. "
                  "`import lazyfs_snapshot` works in every run. Example: "
                  "lazyfs run demo:latest --store ./store -- sh -c 'cat /etc/os-release'")
@with_source
def run(
    ref: str = typer.Argument(..., metavar="NAME:TAG"),
    cmd: Optional[List[str]] = typer.Argument(None, metavar="[-- CMD ARGS...]"),
    cache_dir: Optional[str] = CacheOpt,
    profile: str = ProfileOpt,
    data_path: str = DataPathOpt,
    complete: bool = CompleteOpt,
    node: bool = NodeOpt,
    runtime: str = RuntimeOpt,
    upper: Optional[str] = typer.Option(None, "--upper", help="Keep the writable layer in this "
                                        "directory (default: a temporary one, removed on exit)."),
    env: Optional[List[str]] = EnvOpt,
    workdir: Optional[str] = WorkdirOpt,
    user: Optional[str] = UserOpt,
    network: str = NetworkOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Say what ran, and where."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Append one JSON line per read of "
                                        "the image (path, offset, size, time) to this file."),
    stats_json: Optional[str] = typer.Option(None, "--stats-json", metavar="FILE", help="When the "
                                             "command ends, write the mount's counters (as `lazyfs "
                                             "stats` prints them) to FILE."),
    snapshot: Optional[str] = typer.Option(None, "--snapshot", metavar="SNAP", help="Run until the "
                                           "program calls snapshot.ready() (see docs/snapshots.md), "
                                           "dump it with CRIU and publish the snapshot to --store "
                                           "as SNAP (NAME[:TAG]). Runs with the namespaces runtime."),
    restore: Optional[str] = typer.Option(None, "--restore", metavar="SNAP", help="Restore the "
                                          "snapshot SNAP of this image and let it carry on; if the "
                                          "restore fails, start cold instead (with a warning)."),
    lazy: bool = typer.Option(True, "--lazy/--eager", help="With --restore: fetch only what CRIU "
                              "restores itself and serve the process's memory as it touches it, "
                              "the working set a first restore recorded ahead of it (--lazy); or "
                              "fetch the whole snapshot first (--eager)."),
    working_set: bool = typer.Option(True, "--working-set/--no-working-set", help="With --restore "
                                     "--lazy: prefetch the memory a first lazy restore of this "
                                     "snapshot recorded as its working set (a first restore records "
                                     "it when the store takes writes); --no-working-set does neither."),
    snapshot_timeout: str = typer.Option("1h", "--snapshot-timeout", help="With --snapshot: give "
                                         "up if snapshot.ready() is not called within this long."),
    src=None,  # --store, --server, ... (with_source)
):
    from lazyfs.runner.session import RunOptions, run as run_session

    argv = list(cmd or [])
    if argv[:1] == ["--"]:
        argv = argv[1:]
    opts = RunOptions(ref, argv, src, cache_dir, runtime, upper, list(env or []), workdir, user,
                      network, tty=sys.stdin.isatty() and sys.stdout.isatty(), trace=trace,
                      profile=profile, data_path=data_path, complete=complete, node=node)
    say = sayer(verbose)

    def report(s: dict) -> None:
        if stats_json:
            with open(stats_json, "w") as f:
                json.dump(s, f, indent=1)
        say(f"data path: {s.get('data_path', 'fuse')}; image reads: {s['cache']['misses']} blocks fetched ({s['store']['block_bytes']} bytes "
            f"received), {s['cache']['hits']} cache hits; FUSE requests: "
            + ", ".join(f"{k} {v}" for k, v in sorted(s["requests"].items(), key=lambda kv: -kv[1])))
    opts.report = report
    if snapshot and restore:
        raise typer.BadParameter("--snapshot and --restore cannot be combined")
    _check_applies(snapshot, restore)
    _check_ref("--snapshot", snapshot)
    _check_ref("--restore", restore)
    if snapshot or restore:
        if runtime == "podman":
            raise typer.BadParameter("snapshots run with the namespaces runtime, not podman")
        opts.runtime = "namespaces"
    if snapshot:
        from snapshot.capture import capture
        raise typer.Exit(_stoppable(lambda: capture(opts, snapshot, say, parse_duration(snapshot_timeout),
                                                    RichProgress())))
    if restore:
        from snapshot.restore import restore as restore_run
        raise typer.Exit(_stoppable(lambda: restore_run(opts, restore, say, lazy=lazy,
                                                        working_set=working_set,
                                                        progress=RichProgress())))
    raise typer.Exit(run_session(opts, say))


# Options that each apply to one kind of run only: given to another, they would do nothing.
PLAIN_ONLY = {"upper": "--upper", "trace": "--trace", "stats_json": "--stats-json",
              "profile": "--profile", "data_path": "--data-path", "complete": "--complete"}
TAKEN_AT_SNAPSHOT = {"env": "--env", "workdir": "--workdir", "user": "--user", "network": "--network"}
RESTORE_ONLY = {"lazy": "--lazy/--eager", "working_set": "--working-set/--no-working-set"}
SNAPSHOT_ONLY = {"snapshot_timeout": "--snapshot-timeout"}


def _check_applies(snapshot: str | None, restore: str | None) -> None:
    """Refuse an option the run would not honour, rather than drop it without a word."""
    import click

    ctx = click.get_current_context()
    if (snapshot or restore) and (flags := given(ctx, PLAIN_ONLY)):
        raise typer.BadParameter(f"{flags}: only for a plain run, not with --snapshot or --restore "
                                 "(they mount the image their own way)")
    if restore and (flags := given(ctx, TAKEN_AT_SNAPSHOT)):
        raise typer.BadParameter(f"{flags}: a restored process keeps what its snapshot run had "
                                 "(give them with --snapshot); a cold start after a failed restore "
                                 "runs with the snapshot run's too")
    if not restore and (flags := given(ctx, RESTORE_ONLY)):
        raise typer.BadParameter(f"{flags}: only with --restore")
    if not snapshot and (flags := given(ctx, SNAPSHOT_ONLY)):
        raise typer.BadParameter(f"{flags}: only with --snapshot")


def _check_ref(flag: str, value: str | None) -> None:
    """A snapshot's name is checked before anything runs: a bad one is the command line's error,
    not a restore that failed (which would start the program cold)."""
    from lazyfs.errors import InvalidReference
    from lazyfs.format import reference

    if value is None:
        return
    if value.startswith("-"):
        raise typer.BadParameter(f"{flag} takes the snapshot's NAME[:TAG] as its value, not "
                                 f"{value!r} (give options before or after it: {flag} SNAP)")
    try:
        reference.parse(value)
    except InvalidReference as exc:
        raise typer.BadParameter(f"{flag} {value!r}: {exc}") from None


def _stoppable(work) -> int:
    """``work()``'s exit code; a SIGTERM or SIGHUP meanwhile takes its Ctrl-C path (everything it
    started stopped and torn down) and exits as that signal would (128 + its number)."""
    try:
        with spawn.stopping_like_ctrl_c():
            return work()
    except spawn.Terminated as exc:
        print(f"lazyfs: stopped by {signal.Signals(exc.signum).name}", file=sys.stderr)
        return 128 + exc.signum

"""`lazyfs node` (the resident agent) and `lazyfs node status`."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from lazyfs import environ
from lazyfs.cli import app
from lazyfs.cli.common import JsonOpt, err, given, human, out, parse_duration, parse_size

node_app = typer.Typer(no_args_is_help=False, add_completion=False)
app.add_typer(node_app, name="node")


@node_app.callback(invoke_without_command=True, help=(
        "Run the node agent in the foreground (systemd-friendly: a ready line, sd_notify, clean "
        "SIGTERM): one shared mount per image for all its containers, unmounted after --idle "
        "without users; the node cache kept under --cache-size; /metrics for Prometheus. "
        "`lazyfs run` and `lazyfs mount` start it on first use. Restarting it (or SIGKILL) never "
        "breaks running containers: the next agent adopts their mounts. docs/node.md."))
def node(
    ctx: typer.Context,
    socket: Optional[Path] = typer.Option(None, "--socket", envvar=environ.NODE_SOCKET,
                                          help="Unix socket to listen on, root only (default: "
                                          "node.sock in the state directory)."),
    idle: str = typer.Option("5m", "--idle", envvar="LAZYFS_NODE_IDLE", show_envvar=True,
                             help="How long an image no container uses stays mounted (0: unmount "
                             "when the last user leaves)."),
    cache_size: Optional[str] = typer.Option(None, "--cache-size", envvar="LAZYFS_NODE_CACHE_SIZE",
                                             show_envvar=True, help="Cap the node cache (e.g. 50G): "
                                             "least recently used files go first, startup-profile "
                                             "blocks last (default: no cap)."),
    metrics: str = typer.Option("127.0.0.1:9477", "--metrics", envvar="LAZYFS_NODE_METRICS",
                                show_envvar=True, help="HOST:PORT for Prometheus /metrics, or off."),
    takeover: bool = typer.Option(False, "--takeover", help="Replace a running agent: it hands "
                                  "over and exits, leaving every mount up, and this one adopts them."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every mount, lease and unmount."),
    on_demand: bool = typer.Option(False, "--on-demand", hidden=True, help="Started by a client "
                                   "(lazyfs run): an agent started without it takes this one over."),
):
    if ctx.invoked_subcommand:
        # `lazyfs node --socket S status` asks the agent on S; the agent's own options would do
        # nothing for a subcommand, so they are refused rather than dropped.
        agent_only = given(ctx, {name: f"--{name.replace('_', '-')}" for name in
                                 ("idle", "cache_size", "metrics", "takeover", "verbose", "on_demand")})
        if agent_only:
            raise typer.BadParameter(f"{agent_only}: options of the agent itself, not of "
                                     f"`lazyfs node {ctx.invoked_subcommand}`")
        if socket is not None:
            os.environ[environ.NODE_SOCKET] = str(socket)  # (what the client reads)
        return
    from lazyfs import paths
    from lazyfs.node.agent import Agent, AgentOptions
    from lazyfs.proc import syscalls

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("lazyfs.node").setLevel(logging.INFO)
    cap = parse_size(cache_size) if cache_size else None
    opts = AgentOptions(socket or paths.node_socket(), parse_duration(idle), cap or None,
                        None if metrics in ("", "off", "none") else metrics, takeover,
                        on_demand=on_demand, sweep=_sweep_killed)
    agent = Agent(opts)
    syscalls.set_name("lazyfs-node")
    code = agent.run(ready=lambda msg: print(f"lazyfs node: {msg}", flush=True))
    # Not an ordinary exit: that would wait for every pool thread, and one still in a mount
    # stuck on a slow server would hold up a takeover (the agent gave them SHUTDOWN_WAIT).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _sweep_killed() -> int:
    """What runs, snapshot runs and restores killed with SIGKILL left on the node: the agent
    sweeps it as soon as such a run's holder exits (and when it starts), not at the next run."""
    from lazyfs.runner.session import sweep_killed_runs
    from snapshot.workspace import sweep_abandoned
    return sweep_killed_runs() + sweep_abandoned()


@node_app.command(help="List the node's shared mounts, their users, cache use and hit ratio.")
def status(as_json: bool = JsonOpt):
    from lazyfs.node import client
    from rich.table import Table

    answer = client.call("status", autostart=False)
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    a = answer["agent"]
    out.print(f"agent pid {a['pid']} on {a['socket']}; idle unmount after {a['idle']:g} s; cache cap "
              f"{human(a['cache_size']) if a['cache_size'] else 'none'}; metrics "
              f"{'http://' + a['metrics'] + '/metrics' if a['metrics'] else 'off'}", highlight=False)
    runs = a["runs"]
    out.print(f"runs: {runs['forked']} forked warm, {runs['fallbacks']} on the slow path (the full CLI)"
              + (f"; last because: {runs['last_fallback']}" if runs["fallbacks"] else ""), highlight=False)
    snaps = a.get("snapshots") or {}
    if snaps.get("lazy") or snaps.get("fallbacks"):
        out.print(f"containerd layers: {snaps['lazy']} served lazily, {snaps['fallbacks']} unpacked by "
                  "containerd (not in the store)"
                  + (f"; last {snaps['last_fallback']}" if snaps["fallbacks"] else ""), highlight=False)
    table = Table("IMAGE", "DIGEST", "USERS", "DATA PATH", "UP", "HITS", "FETCHED", box=None)
    now = time.time()
    for im in answer["images"]:
        c = im["counters"].get("cache", {})
        users = ", ".join(f"{u['kind']} {u['pid'] or u['target']}" for u in im["users"]) or \
            f"none (idle {now - (im['idle_since'] or now):.0f} s)"
        table.add_row(im["ref"], im["digest"][:19], users, im["layout"], f"{now - im['mounted_at']:.0f} s",
                      str(c.get("hits", "?")), str(c.get("misses", "?")))
    out.print(table)
    for c in answer["caches"]:
        ratio = "n/a" if c["hit_ratio"] is None else f"{c['hit_ratio']:.1%}"
        err.print(f"cache {c['dir']}: {human(c['bytes'])} in {c['files']} files"
                  + (f" of {human(c['cap'])}" if c["cap"] else "") + f"; hit ratio {ratio}", highlight=False)

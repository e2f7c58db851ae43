"""`lazyfs bench`."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lazyfs.cli import app
from lazyfs.cli.common import DataPathOpt, RichProgress, err, parse_duration


@app.command(help="Benchmark cold starts (docs/benchmarks.md): for each workload, start it from a "
                  "cold node (empty node cache, page cache dropped) in each mode — pull (download "
                  "+ extract + run), lazy (the image's first start anywhere), lazy+learnt (after the fleet has "
                  "seen it once), lazy+profile, warm-node, local (the floor) — over an "
                  "emulated link (a network namespace with tbf-shaped loopback, plus per-request "
                  "latency at the servers). Builds its images offline once (cached under --home). "
                  "Writes results.json, results.md and results.png to --out. Needs root.")
def bench(
    workload: Optional[List[str]] = typer.Option(None, "--workload", "-w", help="minimal, torch, torch-nopyc, "
                                                 "imports, http, snapshot, snapshot-one, snapshot-state "
                                                 "(cold init vs CRIU restores; need CRIU) (repeatable; default: all)."),
    mode: Optional[List[str]] = typer.Option(None, "--mode", "-m", help="pull, podman-pull (podman "
                                             "pull from a real registry + podman run), containerd-pull "
                                             "(a CRI pull into containerd's overlayfs snapshotter + "
                                             "ctr run), containerd-lazy (the same through `lazyfs "
                                             "snapshotter`), lazy (no profile: the "
                                             "image's first start anywhere), lazy+learnt (the "
                                             "profile another node's first start learnt), "
                                             "lazy+profile (the one `lazyfs profile` recorded), "
                                             "warm-node, warm-node-fuse (warm-node with --data-path "
                                             "fuse), warm-node-podman (warm-node with podman as the "
                                             "runtime), podman-image (podman run of the image from "
                                             "containers-storage), local-erofs (the rootfs as EROFS "
                                             "on local disk), local-overlay (the extracted rootfs "
                                             "under a writable overlay), local (repeatable; "
                                             "default: all). The "
                                             "snapshot workloads always run their own: cold-init, "
                                             "restore, lazy-restore, lazy-restore+ws; and, named "
                                             "here, podman-pull and containerd-pull of the same "
                                             "program."),
    runs: int = typer.Option(5, "--runs", "-n", min=1, help="Runs per mode."),
    link: str = typer.Option("1gbit", "--link", help="Link rate in tc's spelling: 100mbit, 1gbit, "
                             "10gbit, ..."),
    latency: str = typer.Option("1ms", "--latency", help="Added per request by the servers (the "
                                "kernel here has no netem): the emulated round-trip time."),
    home: Optional[Path] = typer.Option(None, "--home", help="Where images, the bench store and "
                                        "caches are kept between runs (default ~/.cache/lazyfs/bench)."),
    out: Path = typer.Option(Path("bench-results"), "--out", "-o", help="Directory for the results."),
    data_path: str = DataPathOpt,
    cold_servers: bool = typer.Option(False, "--cold-servers", help="Drop the servers' page cache "
                                      "before each run too, as if each had just started. By default "
                                      "only the node's is dropped, and what the servers serve from "
                                      "(the cache server's blocks, the store's tags and records, the "
                                      "registry, the blob server's layout) is read back in: in a "
                                      "fleet they are other machines, with their hot blocks in "
                                      "memory."),
):
    from bench.coldstart import BenchConfig, run
    from bench.images import WORKLOADS
    from bench.link import rate_bits
    from bench.modes import MODES

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise typer.BadParameter("the chart needs matplotlib: pip install 'lazyfs[bench]'") from None
    rate_bits(link)
    chosen = list(workload or WORKLOADS)
    from bench.images import SNAPSHOT_WORKLOADS
    if not workload:
        from snapshot.criu import CriuError, find
        try:
            find()
        except CriuError as exc:  # the scenarios need CRIU; the rest do not
            err.print(f"bench: leaving out the snapshot scenarios: {exc}", highlight=False)
            chosen = [w for w in chosen if w not in SNAPSHOT_WORKLOADS]
    from bench.images import SNAPSHOT_BASELINES
    cfg = BenchConfig(chosen, list(mode or MODES), runs, link,
                      parse_duration(latency), out=out, data_path=data_path,
                      baselines=[m for m in mode or [] if m in SNAPSHOT_BASELINES],
                      cold_servers=cold_servers)
    if home:
        cfg.home = home
    say = lambda m: err.print(f"bench: {m}", highlight=False, markup=False)  # noqa: E731
    with RichProgress(counting="runs") as progress:
        results = run(cfg, progress, say)
    from bench.report import markdown
    print(markdown(results))
    err.print(f"results in {out}/results.json, results.md, results.png", highlight=False)

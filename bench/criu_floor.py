"""The floor a restore is measured against: CRIU restoring a snapshot's dump from tmpfs, the image
already mounted, no lazyfs around it (no page server, no fetch, no agent).

    python -m bench.criu_floor [--snapshot REF] [--image REF] [--store DIR] [--runs N]

Before the timed part, every file of the snapshot (its CRIU images with all memory pages, its
writable layer) is fetched into a tmpfs once, and the image is mounted from a node cache that
holds what the process maps (a warm node). Each run then unpacks the writable layer, drops the
page cache (the tmpfs stays), starts the clock, runs the same `criu restore` (eager: pages from
the images) in the same private mount namespace `lazyfs run --restore` uses, gives the tree its
own /proc and lets it go on, as every restore must, and stops the clock when it prints its
first line after the snapshot point ("served ..." for the bench's snapshot programs).
Defaults: the bench's snapshot-one snapshot and store.
Needs root and a working criu.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

from bench.pagecache import drop_caches
from lazyfs.source.spec import Source
from lazyfs.proc import ident
from snapshot import criu as criu_mod
from snapshot.files import fetch
from snapshot.restore import criu_restore, load
from snapshot.workspace import MOUNT_BASE, Workspace

HOME = Path.home() / ".cache" / "lazyfs" / "bench"


def first_line(path: Path, start: int, timeout: float = 120.0) -> float:
    """Wait until the file has a complete line after ``start``; the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, "rb") as f:
            f.seek(start)
            if b"\n" in f.read():
                return time.monotonic()
        time.sleep(0.002)
    raise TimeoutError(f"no output in {path} after {timeout:.0f} s")


def run(snapshot: str, image: str, store: str, cache_dir: str, runs: int) -> dict:
    criu = criu_mod.find()
    source = Source(store)
    reader = source.open()
    try:
        digest, _, snap = load(reader, image, snapshot)
        src = MOUNT_BASE / f"floor-src-{uuid.uuid4().hex[:8]}"  # /run: a tmpfs
        fetch(reader.fetch_block, snap.files, src)
    finally:
        reader.close()
    samples = []
    try:
        for i in range(runs):
            ws = Workspace(MOUNT_BASE / f"floor-{uuid.uuid4().hex[:16]}")
            try:
                shutil.copytree(src, ws.base / "snap")
                ws.mount_image(digest, source, cache_dir, profile="none")
                drop_caches()
                t0 = time.monotonic()
                pid, stdio_at, (prepare_s, restore_s) = criu_restore(criu, digest, snap, ws, None,
                                                                     guard=False)  # (criu alone)
                try:
                    served = first_line(ws.stdio, stdio_at) - t0
                finally:
                    _reap(pid)
                samples.append({"served_s": round(served, 3), "criu_s": round(restore_s - prepare_s, 3),
                                "prepare_s": round(prepare_s, 3)})
                print(f"run {i + 1}/{runs}: {samples[-1]}", file=sys.stderr, flush=True)
            finally:
                ws.remove()
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return {"snapshot": snapshot, "image": image, "runs": samples,
            "median": {k: statistics.median(s[k] for s in samples) for k in samples[0]} if samples else {}}


def _reap(pid: int) -> None:
    """The restored process is left to finish; wait for it (it is our child or criu's sibling)."""
    if not ident.wait_gone(pid, 60):
        os.kill(pid, signal.SIGKILL)
        ident.wait_gone(pid, 10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--snapshot", default="bench/snapshot-one-warm:latest")
    p.add_argument("--image", default="bench/torch:latest")
    p.add_argument("--store", default=str(HOME / "store"))
    p.add_argument("--cache-dir", default=str(HOME / "node-cache-warm"),
                   help="node cache the image is mounted from (warm: holds what the process maps)")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.criu_floor: needs root", file=sys.stderr)
        return 2
    print(json.dumps(run(a.snapshot, a.image, a.store, a.cache_dir, a.runs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

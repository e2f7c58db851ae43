"""A warm program restored from a local store (no link), against its own cold start and CRIU's
floor.

    python -m bench.local_restore [--runs N] [--home DIR] [--out DIR]

The program (the bench's snapshot-state workload, bench.images): `import torch`, 64 MiB
from os.urandom, a 64 MiB torch.randn tensor and an open file, then snapshot.ready(), then one
line with a hash of the bytes, the tensor's sum, the file's next bytes and fresh randomness.
Its image is the bench's torch image in the bench's local store (built as `lazyfs bench` builds
it, once). Modes, alternating run by run, each timed from the start of `lazyfs run` to the
program's line, the page cache dropped before each:

- cold-start: the program from its first line, on a cold node (a new, empty node cache), with
  the startup profile `lazyfs profile` recorded of it first (a node that reads a store directly
  learns none by itself; recorded, it is the same whatever ran on the store before);
- restore: `lazyfs run --restore --lazy` of its snapshot, with the working set a first restore
  recorded, on a cold node;
- restore-mounted: the same on a node whose agent has the image mounted already and its node
  cache holds what the process maps (the floor's setting; the snapshot's memory still comes from
  the store);
- criu-floor: bench.criu_floor on the same dump, from that node cache (timed from `criu
  restore`, the dump already in a tmpfs).

Every restored line must carry the snapshot's state and a randomness no other line had. Writes
local-restore.json and local-restore.md to --out.
Needs root and a working criu.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench import criu_floor
from bench.coldstart import _private_node, _publish
from bench.images import WORKLOADS, Images
from bench.modes import FALLBACK
from bench.pagecache import drop_caches
from bench.servers import LAZYFS

# The bench's own workload: one argv (so one startup-profile key), image and line to wait for.
WORK = WORKLOADS["snapshot-state"]
IMAGE = f"bench/{WORK.image}:latest"
SNAPSHOT = "bench/local-program-warm:latest"
MODES = ("cold-start", "restore", "restore-mounted", "criu-floor")


class LocalRestoreError(RuntimeError):
    pass


def _busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # (busy, all): idle and iowait apart


def settle(quiet: float = 0.1, window: float = 0.3, bound: float = 20.0) -> None:
    """Wait until the machine is idle (under ``quiet`` of its CPU busy over ``window``): what
    the runs before left behind (the agent's idle mounts completing whole files, cache writes)
    must not land on the next run's clock. Gives up after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        b0, a0 = _busy()
        time.sleep(window)
        b1, a1 = _busy()
        if (b1 - b0) <= quiet * max(1, a1 - a0):
            return


def _line(cmd: list[str], timeout: float = 120.0) -> tuple[float, str]:
    """Run ``cmd`` on a settled node and a dropped page cache; (seconds to the program's
    line, the line)."""
    settle()
    drop_caches()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith(WORK.expect):
                seconds = time.monotonic() - t0
                proc.wait(timeout)
                err = proc.stderr.read()
                if FALLBACK in err:
                    raise LocalRestoreError(f"{' '.join(cmd[2:5])}: fell back: {err.strip()[-300:]}")
                return seconds, line.strip()
        proc.wait(timeout)
        raise LocalRestoreError(f"{' '.join(cmd[2:5])}: no line; {proc.stderr.read().strip()[-500:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Node:
    def __init__(self, home: Path, store: Path):
        self.home, self.store = home, str(store)
        self.caches = home / "local-restore-caches"  # a new one per cold run
        self.mounted = home / "local-restore-mounted"  # kept: its mount stays up in the agent

    def cold_cache(self) -> str:
        shutil.rmtree(self.caches, ignore_errors=True)
        path = self.caches / uuid.uuid4().hex[:12]
        path.mkdir(parents=True)
        return str(path)

    def snapshot(self) -> None:
        subprocess.run([*LAZYFS, "run", "--snapshot", SNAPSHOT, "--store", self.store,
                        "--cache-dir", self.cold_cache(), IMAGE, "--", *WORK.argv],
                       check=True, capture_output=True)

    def record_profile(self) -> None:
        subprocess.run([*LAZYFS, "profile", "--runtime", "namespaces", "--store", self.store,
                        "--cache-dir", self.cold_cache(), IMAGE, "--", *WORK.argv],
                       check=True, capture_output=True)

    def run(self, mode: str) -> tuple[float, str]:
        if mode == "criu-floor":
            settle()
            return criu_floor.run(SNAPSHOT, IMAGE, self.store, str(self.mounted), 1)["median"]["served_s"], ""
        if mode == "cold-start":
            return _line([*LAZYFS, "run", "--store", self.store, "--cache-dir", self.cold_cache(),
                          "--profile", IMAGE, IMAGE, "--", *WORK.argv])
        cache = str(self.mounted) if mode == "restore-mounted" else self.cold_cache()
        return _line([*LAZYFS, "run", "--restore", SNAPSHOT, "--lazy", "--store", self.store,
                      "--cache-dir", cache, IMAGE])


def run(home: Path, runs: int, say=lambda m: None) -> dict:
    images = Images(home, say)
    images.ensure(WORK.image)
    _publish(images, home / "store", WORK.image)
    node = Node(home, home / "store")
    samples: dict[str, list[dict]] = {m: [] for m in MODES}
    with _private_node(home):
        say("recording the program's startup profile, for its cold start")
        node.record_profile()
        say("taking the snapshot (CRIU)")
        node.snapshot()
        say("a first restore records the working set; another mounts the image for restore-mounted")
        node.run("restore")
        shutil.rmtree(node.mounted, ignore_errors=True)
        node.mounted.mkdir(parents=True)
        node.run("restore-mounted")
        for i in range(runs):
            for mode in MODES:
                say(f"{mode} run {i + 1}/{runs}")
                seconds, line = node.run(mode)
                samples[mode].append({"seconds": round(seconds, 3), "line": line})
    _check(samples)
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": runs, "samples": samples}


def _check(samples: dict) -> None:
    """Restored lines: the snapshot's state (one hash, sum and file position), each its own
    randomness."""
    restored = [s["line"].split() for m in ("restore", "restore-mounted") for s in samples[m]]
    if len({tuple(parts[1:4]) for parts in restored}) > 1:
        raise LocalRestoreError("restored copies disagree on the snapshot's state")
    if len({parts[4] for parts in restored}) != len(restored):
        raise LocalRestoreError("two restored copies drew the same randomness")


def markdown(result: dict) -> str:
    med = {m: statistics.median(s["seconds"] for s in v) for m, v in result["samples"].items()}
    floor = med["criu-floor"]
    rows = ["| mode | median s | min–max s | × cold-start | × CRIU floor |", "|---|---|---|---|---|"]
    for mode, v in result["samples"].items():
        secs = [s["seconds"] for s in v]
        rows.append(f"| {mode} | {med[mode]:.2f} | {min(secs):.2f}–{max(secs):.2f} | "
                    f"{med[mode] / med['cold-start']:.2f} | {med[mode] / floor:.2f} |")
    return (f"Local store, {result['runs']} runs per mode, {result['date']}: to the program's "
            f"line after `lazyfs run` starts (page cache dropped).\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--home", type=Path, default=criu_floor.HOME)
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.local_restore: needs root", file=sys.stderr)
        return 2
    result = run(a.home, a.runs, say=lambda m: print(f"local-restore: {m}", file=sys.stderr, flush=True))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "local-restore.json").write_text(json.dumps(result, indent=1))
    (a.out / "local-restore.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

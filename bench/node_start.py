"""Container starts through the node agent: what `lazyfs run` costs when the image is already
mounted, when it is not, ten at once, and an idle unmount.

    python -m bench.node_start                 # 20 runs per case
    python -m bench.node_start -n 50 --out bench-results/node.json

The minimal bench image (static busybox, bench/images.py) is built into a store of its own, with a
node cache, state directory and agent of its own (nothing is shared with the machine's). Cases:

- ``warm``: `lazyfs run -- /bin/true` on an image the agent has mounted (namespaces runtime), and
  the same with podman, beside `podman run --rootfs` of a copy of the same tree on local disk
  (podman's own cost); and `--no-node` (a mount per run, as before the agent) for comparison;
- ``cold``: the image not mounted (the agent unmounts it when the run ends: --idle 0): time to the
  first line of output, with the node cache holding the image's blocks, and with it emptied first;
- ``burst``: 10 runs started at once on a warm node: wall time, how many mounts, the agent's,
  the mount daemon's and the runs' memory;
- ``unmount``: the agent's own measure of each idle unmount (lazyfs_node_unmount_seconds).

Each run is a `lazyfs` process as a user starts it, timed from spawn to exit (or to its first
output line). Prints JSON (medians, p90, every sample) and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.images import Images

# The console script, as users run it (its entry point, lazyfs.entry, takes the zygote path;
# `python -m lazyfs.cli` would import the whole CLI first).
LAZYFS = [str(Path(sys.executable).with_name("lazyfs"))]


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median_ms": round(statistics.median(xs) * 1000, 1),
            "p90_ms": round(xs[int(0.9 * (len(xs) - 1))] * 1000, 1),
            "min_ms": round(xs[0] * 1000, 1), "samples_ms": [round(x * 1000, 1) for x in xs]}


def _timed(cmd: list[str], env: dict, first_line: bool = False) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if first_line:
        proc.stdout.readline()
        t = time.perf_counter() - t0
        proc.communicate()
    else:
        _, err = proc.communicate()
        t = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr and err}")
    return t


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Node:
    """A store, node cache, state directory and agent of the bench's own."""

    def __init__(self, work: Path, idle: str):
        self.work = work
        self.env = {**os.environ, "LAZYFS_STORE": str(work / "store"), "LAZYFS_CACHE_DIR": str(work / "cache"),
                    "LAZYFS_STATE_DIR": str(work / "state"), "LAZYFS_NODE": "auto",
                    "LAZYFS_NODE_SOCKET": str(work / "node.sock"), "LAZYFS_NODE_IDLE": idle,
                    "LAZYFS_NODE_METRICS": "127.0.0.1:0"}
        self.agent: subprocess.Popen | None = None

    def start(self) -> "Node":
        self.agent = subprocess.Popen([*LAZYFS, "node"], env=self.env, stdout=subprocess.PIPE,
                                      stderr=open(self.work / "agent.log", "ab"), text=True)
        line = self.agent.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"the agent did not start: {line!r}; {self.work / 'agent.log'}")
        return self

    def status(self) -> dict:
        out = subprocess.run([*LAZYFS, "node", "status", "--json"], env=self.env, capture_output=True,
                             text=True, check=True)
        return json.loads(out.stdout)

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.terminate()
            self.agent.wait(timeout=30)
            self.agent = None


def run_cases(tag: str, store_src: Path, runs: int, say) -> dict:
    result: dict = {}
    true = ["/bin/busybox", "true"]
    with tempfile.TemporaryDirectory(prefix="lazyfs-nodebench-") as tmp:
        work = Path(tmp)
        shutil.copytree(store_src, work / "store")
        node = Node(work, "60s").start()
        try:
            run = [*LAZYFS, "run", "--runtime", "namespaces", tag, "--"]
            _timed([*run, *true], node.env)  # mounts it, fills the node cache
            say("warm: image mounted")
            result["warm_namespaces"] = _stats([_timed([*run, *true], node.env) for _ in range(runs)])
            result["warm_no_node"] = _stats([_timed([*LAZYFS, "run", "--no-node", "--runtime", "namespaces",
                                                     tag, "--", *true], node.env) for _ in range(runs)])
            if shutil.which("podman") and shutil.which("runc"):
                pod = [*LAZYFS, "run", "--runtime", "podman", tag, "--", *true]
                result["warm_podman"] = _stats([_timed(pod, node.env) for _ in range(runs)])
                # podman on its own, on a copy of the same tree on local disk (it writes /etc).
                rootfs = work / "podman-rootfs"
                subprocess.run(["cp", "-a", node.status()["images"][0]["mountpoint"] + "/.", str(rootfs)],
                               check=True)
                from lazyfs.runner import runtime as rt
                bare = rt.podman_command(rootfs, rt.Spec(argv=true), "lazyfs-bench-bare")
                result["podman_alone"] = _stats([_timed(bare, node.env) for _ in range(runs)])
            say("burst: 10 at once")
            result["burst_10"] = _burst(node, [*run, "/bin/busybox", "sh", "-c", "sleep 1"])
        finally:
            node.stop()
        for cache_state in ("cache_warm", "cache_empty"):
            node = Node(work, "0").start()
            try:
                samples = []
                for _ in range(runs):
                    if cache_state == "cache_empty":
                        shutil.rmtree(work / "cache", ignore_errors=True)
                    samples.append(_timed([*LAZYFS, "run", "--runtime", "namespaces", tag, "--",
                                           "/bin/busybox", "echo", "ready"], node.env, first_line=True))
                result[f"cold_first_output_{cache_state}"] = _stats(samples)
                result["unmount"] = _unmount_times(node)
            finally:
                node.stop()
            say(f"cold ({cache_state}) done")
    return result


def _burst(node: Node, cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=node.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(10)]
    time.sleep(0.5)
    status = node.status()
    images = status["images"]
    daemon = images[0]["daemon_pid"] if images else None
    mem = {"agent_rss_kib": _rss_kib(node.agent.pid), "daemon_rss_kib": _rss_kib(daemon) if daemon else None}
    peaks = []
    for p in procs:
        _, _, usage = os.wait4(p.pid, 0)
        p.returncode = 0
        peaks.append(usage.ru_maxrss)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 3), "mounts": len(images), "users_seen": sum(len(i["users"]) for i in images),
            **mem, "client_peak_rss_kib_max": max(peaks)}


def _unmount_times(node: Node) -> dict:
    addr = node.status()["agent"]["metrics"]
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    vals = {}
    for line in text.splitlines():
        for key in ("lazyfs_node_unmount_seconds_sum", "lazyfs_node_unmount_seconds_count"):
            if line.startswith(key + " "):
                vals[key] = float(line.split()[1])
    n = vals.get("lazyfs_node_unmount_seconds_count", 0)
    return {"count": int(n), "mean_ms": round(vals["lazyfs_node_unmount_seconds_sum"] / n * 1000, 1) if n else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=20)
    ap.add_argument("--home", type=Path, default=Path.home() / ".cache/lazyfs/bench")
    ap.add_argument("--out", type=Path, default=Path("bench-results/node.json"))
    args = ap.parse_args(argv)
    say = lambda m: print(f"bench: {m}", file=sys.stderr)  # noqa: E731
    images = Images(args.home, say)
    layout = images.ensure("minimal")
    with tempfile.TemporaryDirectory(prefix="lazyfs-nodebench-store-") as tmp:
        store = Path(tmp) / "store"
        subprocess.run([*LAZYFS, "build", f"oci:{layout}:minimal", "--store", str(store), "--tag",
                        "bench/minimal:1"], check=True, capture_output=True)
        result = {"runs": args.runs, "cpus": os.cpu_count(), "kernel": os.uname().release,
                  **run_cases("bench/minimal:1", store, args.runs, say)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "samples_ms"} if isinstance(v, dict) else v)
                      for k, v in result.items()}, indent=2))
    return result


if __name__ == "__main__":
    main()

"""Building from a registry: `lazyfs build docker://…` against `skopeo copy` to oci: followed by
`lazyfs build oci:`, on the bench link.

    python -m bench.registry_build                       # torch, 1gbit, 3 runs
    python -m bench.registry_build -w python -n 5 --link 100mbit

A real registry (Debian's docker-registry) runs inside the bench link's network namespace (bench/
link.py: tbf-shaped loopback), holding a bench image pushed from the bench layout (bench/images.py).
Every run builds into a fresh, empty store, so every block is compressed and written. Modes:

- ``registry``: ``lazyfs build docker://…`` (layers streamed into the build);
- ``skopeo+oci``: ``skopeo copy docker://… oci:TMP`` then ``lazyfs build oci:TMP`` (the two-step path);
- ``local``: ``lazyfs build oci:`` from the bench layout on local disk (the build's own cost, no network);
- ``download``: every layer read from the registry with lazyfs's own BlobReader, one after the
  other, and thrown away (the network's cost, no build).

If ``registry`` ≈ max(``local``, ``download``), streaming already overlaps download with chunking
and compression, and fetching layers ahead in parallel could only win the difference.
Prints JSON (medians and every run, wall and CPU seconds: this machine's wall times vary by a
third from run to run, its CPU seconds much less) and writes it to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.images import Images
from bench.link import Link
from bench.registry import RegistryServer, skip_reason
from bench.servers import LAZYFS

MODES = ("registry", "skopeo+oci", "local", "download")


def _lazyfs(*args: str) -> None:
    proc = subprocess.run([*LAZYFS, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lazyfs {' '.join(args)}: {proc.stderr.strip()[-1000:]}")


def _download(host: str, repo: str) -> int:
    from imagebuilder.sources import dockerref
    from imagebuilder.sources.registry import Registry

    reg = Registry(dockerref.parse(f"docker://{host}/{repo}"), tls_verify=False)
    data, _, _ = reg.manifest("1")
    total = 0
    for layer in json.loads(data)["layers"]:
        with reg.blob(layer["digest"], layer["size"]) as blob:
            while chunk := blob.read(1 << 20):
                total += len(chunk)
    return total


def run_mode(mode: str, reg: RegistryServer, layout: str, repo: str, work: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the processes it ran: less sensitive to a noisy machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    wall = _run_mode(mode, reg, layout, repo, work)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    self_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
           + self_after.ru_utime + self_after.ru_stime - self_before.ru_utime - self_before.ru_stime)
    return wall, cpu


def _run_mode(mode: str, reg: RegistryServer, layout: str, repo: str, work: Path) -> float:
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    ref = f"docker://{reg.host}/{repo}"
    t0 = time.perf_counter()
    if mode == "registry":
        _lazyfs("build", ref, "--tls-verify=false", "--store", str(store))
    elif mode == "skopeo+oci":
        copy = work / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", ref, f"oci:{copy}:x"],
                       check=True, capture_output=True)
        _lazyfs("build", f"oci:{copy}:x", "--store", str(store))
    elif mode == "local":
        _lazyfs("build", f"oci:{layout}", "--store", str(store))
    else:
        _download(reg.host, repo)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-w", "--workload", default="torch", help="a bench image (torch, torch-nopyc, python, base)")
    ap.add_argument("-n", "--runs", type=int, default=3)
    ap.add_argument("--link", default="1gbit")
    ap.add_argument("-m", "--mode", action="append", choices=MODES)
    ap.add_argument("--home", type=Path, default=Path.home() / ".cache/lazyfs/bench")
    ap.add_argument("--out", type=Path, default=Path("bench-results/registry-build.json"))
    args = ap.parse_args(argv)
    if skip_reason():
        raise SystemExit(skip_reason())
    images = Images(args.home, say=lambda m: print(f"bench: {m}", file=sys.stderr))
    layout = f"{images.ensure(args.workload)}:{args.workload}"
    modes = args.mode or list(MODES)
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="lazyfs-regbench-") as tmp, Link(args.link) as link:
        work = Path(tmp)
        with RegistryServer(work / "registry") as reg:
            reg.push(f"oci:{layout}", f"bench/{args.workload}:1")
            layer_bytes = _download(reg.host, f"bench/{args.workload}")
            for i in range(args.runs):
                for mode in modes:  # interleaved, so drift hits every mode alike
                    wall, used = run_mode(mode, reg, layout, f"bench/{args.workload}:1", work)
                    times[mode].append(round(wall, 3))
                    cpu[mode].append(round(used, 3))
                    print(f"bench: run {i + 1} {mode}: {wall:.2f} s ({used:.2f} s CPU)", file=sys.stderr)
        link_text = link.describe()
    med = {m: round(statistics.median(v), 3) for m, v in times.items()}
    result = {"workload": args.workload, "link": link_text, "runs": args.runs,
              "compressed_layer_bytes": layer_bytes, "median_s": med, "runs_s": times,
              "median_cpu_s": {m: round(statistics.median(v), 3) for m, v in cpu.items()}, "cpu_s": cpu,
              "cpus": os.cpu_count()}
    if "registry" in med and "skopeo+oci" in med:
        result["registry_over_skopeo_oci"] = round(med["registry"] / med["skopeo+oci"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

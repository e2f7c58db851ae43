"""A burst of nodes starting one image at once through a cache fleet over an S3 origin.

    python -m bench.fleet_burst [--nodes 100] [--servers 3] [--image-mb 64]

Starts a real SeaweedFS S3 server, builds an image of --image-mb of incompressible files into it,
starts --servers `lazyfs serve` processes over it, then forks --nodes node processes that wait at
a barrier and then read every file of the image through their own Fleet client and their own
empty node cache (4 reads in flight per node, as readahead does), hashing what they read. Prints
JSON: whether every node read exactly the image's bytes, per-node times, and the origin traffic
against the image's unique stored bytes (the fleet should fetch each block from S3 about once).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lazyfs.format.manifest import EntryType

MiB = 1024 * 1024


def make_rootfs(root: Path, total: int) -> dict[str, str]:
    """Files of mixed sizes (small ones whole, big ones many blocks); returns path → sha256."""
    sizes = [4096, 60_000, 300_000, 2 * MiB, 5 * MiB + 77]
    expected, written, i = {}, 0, 0
    (root / "data").mkdir(parents=True)
    while written < total:
        size = min(sizes[i % len(sizes)], total - written)
        data = os.urandom(size)
        rel = f"data/f{i:05d}.bin"
        (root / rel).write_bytes(data)
        expected[rel] = hashlib.sha256(data).hexdigest()
        written += size
        i += 1
    return expected


def node(args) -> dict:
    """One node: its own fleet client and empty node cache; read and hash every file."""
    servers, files, cache_dir, barrier = args
    from lazyfs.cache.nodecache import NodeCache
    from lazyfs.source.fleet import Fleet, FleetOptions

    fleet = Fleet(servers, options=FleetOptions(deadline=60))
    cache = NodeCache(cache_dir, fleet.fetch_block)
    barrier.wait()
    t0 = time.monotonic()
    digests = {}
    errors = 0
    with ThreadPoolExecutor(4) as pool:
        for rel, chunks in files:
            try:
                parts = pool.map(lambda c: cache.read(c[0], c[1], 0, c[1]), chunks)
                digests[rel] = hashlib.sha256(b"".join(parts)).hexdigest()
            except Exception:  # noqa: BLE001 - counted and reported
                errors += 1
    elapsed = time.monotonic() - t0
    stats = fleet.stats.snapshot()
    fleet.close()
    return {"seconds": elapsed, "digests": digests, "errors": errors, "stats": stats}


def _node_star(args):
    return node(args)


def run(nodes: int, server_count: int, image_bytes: int, work: Path, s3) -> dict:
    from lazyfs.records import objects
    from lazyfs.store.s3 import S3Store
    from bench.servers import CacheServer, lazyfs_cli

    url = f"s3://lazyfs-burst/{os.getpid()}"
    s3.make_bucket("lazyfs-burst")
    expected = make_rootfs(work / "rootfs", image_bytes)
    lazyfs_cli("build", f"dir:{work / 'rootfs'}", "--tag", "burst/app:1", "--store", url, timeout=900)
    store = S3Store(url)
    manifest = objects.read_manifest(store, store.get_tag("burst/app", "1"))
    files = [(e.path.decode(), [(c.digest, c.size) for c in e.chunks])
             for e in manifest.entries if e.type == EntryType.REG]
    unique = {d for _, chunks in files for d, _ in chunks}
    unique_stored = sum(store.block_size(d) or 0 for d in unique)
    servers = [CacheServer(url, work / f"server-{i}", extra=("--no-access-log",)).start()
               for i in range(server_count)]
    try:
        ctx = mp.get_context("fork")
        barrier = ctx.Manager().Barrier(nodes)
        jobs = [([s.url for s in servers], files, str(work / f"node-{i}"), barrier) for i in range(nodes)]
        t0 = time.monotonic()
        with ctx.Pool(nodes) as pool:
            results = pool.map(_node_star, jobs)
        wall = time.monotonic() - t0
        metrics = [s.metrics() for s in servers]
    finally:
        for s in servers:
            s.stop()
    origin_bytes = sum(m["lazyfs_server_origin_bytes_total"] for m in metrics)
    origin_fetches = sum(m["lazyfs_server_origin_fetches_total"] for m in metrics)
    times = sorted(r["seconds"] for r in results)
    return {
        "nodes": nodes, "servers": server_count, "image_bytes": image_bytes,
        "unique_blocks": len(unique), "unique_stored_bytes": unique_stored,
        "all_nodes_correct": all(r["digests"] == expected for r in results),
        "node_errors": sum(r["errors"] for r in results),
        "origin_fetches": int(origin_fetches), "origin_bytes": int(origin_bytes),
        # nodes get the file list from the bench, so servers fetch blocks only
        "origin_to_unique_bytes": round(origin_bytes / unique_stored, 4),
        "hedges": sum(r["stats"]["hedges"] for r in results),
        "failovers": sum(r["stats"]["failovers"] for r in results),
        "node_seconds": {"min": round(times[0], 3), "median": round(statistics.median(times), 3),
                         "max": round(times[-1], 3)},
        "wall_seconds": round(wall, 3),
        "bytes_served_to_nodes": nodes * sum(store.block_size(d) or 0 for _, ch in files for d, _ in ch),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--image-mb", type=int, default=64)
    a = p.parse_args(argv)
    from bench.servers import SeaweedS3
    with tempfile.TemporaryDirectory(prefix="lazyfs-burst-") as tmp:
        s3 = SeaweedS3(Path(tmp) / "s3").start()
        os.environ.update(s3.env())
        try:
            result = run(a.nodes, a.servers, a.image_mb * MiB, Path(tmp), s3)
        finally:
            s3.stop()
    print(json.dumps(result, indent=2))
    return 0 if result["all_nodes_correct"] and result["node_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

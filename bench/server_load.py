"""Hot-read load on one cache server over loopback: N concurrent clients GET cached blocks.

    python -m bench.server_load [--clients 32] [--block-size 1M] [--blocks 64] [--requests 6000]

Starts a real `lazyfs serve` process over a local origin holding --blocks incompressible blocks,
warms its cache (one GET each), then runs --requests GETs from --clients concurrent aiohttp
clients in this process (bounded: no endless loops) and prints throughput and latency
percentiles as JSON. Every answer is checked against the frame that was stored.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from lazyfs.cli.common import parse_size
from lazyfs.format import block
from lazyfs.store.local import LocalStore


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(origin: Path, cache: Path, extra=()) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs.cli", "serve", "--store", str(origin),
                             "--listen", f"127.0.0.1:{port}", "--cache-dir", str(cache),
                             "--no-access-log", *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("server did not start")


async def run_load(url: str, frames: dict[str, bytes], clients: int, requests: int) -> dict:
    digests = list(frames)
    latencies: list[float] = []
    errors = 0
    wrong = 0
    counter = iter(range(requests))
    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def client(k: int):
            nonlocal errors, wrong
            for i in counter:
                d = digests[(i * 7 + k) % len(digests)]
                t0 = time.perf_counter()
                try:
                    async with session.get(f"{url}/v1/blocks/{d}") as resp:
                        body = await resp.read()
                        if resp.status != 200:
                            errors += 1
                            continue
                except aiohttp.ClientError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if body != frames[d]:
                    wrong += 1
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.perf_counter() - t0
    size = len(next(iter(frames.values())))
    q = statistics.quantiles(latencies, n=100)
    return {"clients": clients, "requests": len(latencies), "errors": errors, "wrong_bytes": wrong,
            "seconds": round(elapsed, 3), "requests_per_s": round(len(latencies) / elapsed, 1),
            "MB_per_s": round(len(latencies) * size / elapsed / 1e6, 1),
            "p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2),
            "max_ms": round(max(latencies) * 1000, 2), "block_bytes": size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--block-size", default="1M")
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--requests", type=int, default=6000)
    a = p.parse_args(argv)
    size = parse_size(a.block_size)
    with tempfile.TemporaryDirectory(prefix="lazyfs-load-") as tmp:
        origin = LocalStore(Path(tmp) / "origin")
        frames = {}
        for _ in range(a.blocks):
            d, f = block.encode(os.urandom(size))
            origin.put_block(d, f)
            frames[d] = f
        proc, url = start_server(origin.root, Path(tmp) / "cache")
        try:
            for d in frames:  # warm: every block cached
                urllib.request.urlopen(f"{url}/v1/blocks/{d}", timeout=30).read()
            result = asyncio.run(run_load(url, frames, a.clients, a.requests))
        finally:
            proc.terminate()
            proc.wait(10)
    print(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 and result["wrong_bytes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Load on one cache server over loopback, bounded (a fixed number of requests), every answer checked.

    python -m bench.server_load                    # hot reads: 32 clients, 1 MiB blocks
    python -m bench.server_load --mix --clients 64 --requests 10000 --block-size 128k
    python -m bench.server_load --batch 64 --clients 4 --requests 400 --block-size 256k

Starts a real `lazyfs serve` process (bench/servers.py) over a local origin. Hot mode warms the cache with every
block, then N concurrent aiohttp clients GET cached blocks. Mixed mode sends, per 10 requests:
6 GETs of cached blocks, 1 GET of a block never asked for before (a miss: origin fetch), 1 Range
GET, 1 batch of 8 blocks, 1 HEAD. Batch mode sends only batches of N cached blocks, as a node's
profile prefetch and a restore's working-set stream do. Prints JSON: throughput, latency
percentiles, errors, wrong bytes, origin fetches, the server's CPU time for the load (and per
byte of frames sent) and its peak RSS (VmHWM).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from lazyfs.cli.common import parse_size
from lazyfs.format import batch, block
from lazyfs.store.local import LocalStore
from bench.servers import CacheServer


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _parse_batch(body: bytes) -> list[tuple[str, bytes | None]]:
    out, pos = [], 0
    while pos < len(body):
        end = body.index(b"\n", pos)
        header = batch.decode_header(body[pos:end + 1])
        pos = end + 1
        out.append((header.digest, body[pos:pos + header.length] if header.status == 200 else None))
        pos += header.length
    return out


MIX = ("hit",) * 6 + ("miss", "range", "batch", "head")


class Load:
    def __init__(self, url: str, hot: dict[str, bytes], cold: dict[str, bytes], mix: bool,
                 batch: int = 0):
        self.url, self.hot, self.mix, self.batch = url, hot, mix, batch
        self.frames = {**hot, **cold}
        self.hot_list = list(hot)
        self.cold_list = list(cold)
        self.latencies: dict[str, list[float]] = {}
        self.errors = self.wrong = self.frame_bytes = 0

    async def one(self, session: aiohttp.ClientSession, i: int, rng: random.Random) -> None:
        kind = "batch" if self.batch else MIX[i % len(MIX)] if self.mix else "hit"
        if kind == "miss" and not self.cold_list:
            kind = "hit"
        digest = self.cold_list.pop() if kind == "miss" else rng.choice(self.hot_list)
        frame = self.frames[digest]
        t0 = time.perf_counter()
        try:
            if kind == "batch":
                wanted = [rng.choice(self.hot_list) for _ in range(self.batch or 8)]
                async with session.post(f"{self.url}/v1/blocks/batch",
                                        json={"digests": wanted}) as resp:
                    ok = resp.status == 200
                    got = _parse_batch(await resp.read()) if ok else []
                    good = [d for d, _ in got] == wanted and all(
                        f == self.frames[d] for d, f in got)
                    self.frame_bytes += sum(len(f or b"") for _, f in got) if good else 0
            elif kind == "range":
                start = rng.randrange(len(frame))
                stop = min(len(frame), start + rng.randrange(1, 65536))
                async with session.get(f"{self.url}/v1/blocks/{digest}",
                                       headers={"Range": f"bytes={start}-{stop - 1}"}) as resp:
                    ok = resp.status == 206
                    good = await resp.read() == frame[start:stop]
            elif kind == "head":
                async with session.head(f"{self.url}/v1/blocks/{digest}") as resp:
                    ok = resp.status == 200
                    good = int(resp.headers.get("Content-Length", -1)) == len(frame)
            else:
                async with session.get(f"{self.url}/v1/blocks/{digest}") as resp:
                    ok = resp.status == 200
                    good = await resp.read() == frame
                    self.frame_bytes += len(frame) if ok and good else 0
        except aiohttp.ClientError:
            ok, good = False, True
        if not ok:
            self.errors += 1
            return
        self.latencies.setdefault(kind, []).append(time.perf_counter() - t0)
        if not good:
            self.wrong += 1

    async def run(self, clients: int, requests: int) -> float:
        counter = iter(range(requests))
        conn = aiohttp.TCPConnector(limit=clients)
        async with aiohttp.ClientSession(connector=conn) as session:
            async def client(k: int):
                rng = random.Random(k)
                for i in counter:
                    await self.one(session, i, rng)
            t0 = time.perf_counter()
            await asyncio.gather(*(client(k) for k in range(clients)))
            return time.perf_counter() - t0


def _ms(values: list[float], q: int) -> float:
    if len(values) < 2:
        return round((values or [0.0])[0] * 1000, 2)
    return round(statistics.quantiles(values, n=100)[q - 1] * 1000, 2)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure(clients: int, requests: int, size: int, blocks: int, mix: bool, batch: int = 0) -> dict:
    with tempfile.TemporaryDirectory(prefix="lazyfs-load-") as tmp:
        origin = LocalStore(Path(tmp) / "origin")
        cold_n = requests // 10 + 1 if mix else 0
        hot, cold = {}, {}
        for i in range(blocks + cold_n):
            d, f = block.encode(os.urandom(size))
            origin.put_block(d, f)
            (hot if i < blocks else cold)[d] = f
        server = CacheServer(str(origin.root), Path(tmp) / "cache", extra=("--no-access-log",)).start()
        url = server.url
        try:
            for d in hot:  # warm: every hot block cached
                urllib.request.urlopen(f"{url}/v1/blocks/{d}", timeout=30).read()
            load = Load(url, hot, cold, mix, batch)
            cpu0 = cpu_seconds(server.proc.pid)
            elapsed = asyncio.run(load.run(clients, requests))
            cpu = cpu_seconds(server.proc.pid) - cpu0
            metrics = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
            rss = peak_rss(server.proc.pid)
        finally:
            server.stop()
    origin_fetches = sum(float(l.split()[-1]) for l in metrics.splitlines()
                         if l.startswith("lazyfs_server_origin_fetches_total{"))
    everything = [v for vs in load.latencies.values() for v in vs]
    done = len(everything)
    return {"mode": f"batch {batch}" if batch else "mix" if mix else "hot", "clients": clients,
            "requests": done + load.errors,
            "errors": load.errors, "wrong_bytes": load.wrong, "seconds": round(elapsed, 3),
            "requests_per_s": round(done / elapsed, 1), "block_bytes": size,
            "p50_ms": _ms(everything, 50), "p99_ms": _ms(everything, 99),
            "by_kind": {k: {"n": len(v), "p50_ms": _ms(v, 50), "p99_ms": _ms(v, 99)}
                        for k, v in sorted(load.latencies.items())},
            "origin_fetches": int(origin_fetches), "server_peak_rss_bytes": rss,
            "frame_MB_per_s": round(load.frame_bytes / elapsed / 1e6, 1),
            "server_cpu_s": round(cpu, 2),
            "server_cpu_ns_per_frame_byte": round(cpu * 1e9 / max(1, load.frame_bytes), 3),
            "MB_per_s_hot": round(len(load.latencies.get("hit", [])) * size / elapsed / 1e6, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--block-size", default="1M")
    p.add_argument("--blocks", type=int, default=64, help="blocks in the warm (cached) set")
    p.add_argument("--requests", type=int, default=6000)
    p.add_argument("--mix", action="store_true", help="mix hits, misses, Range, batch and HEAD")
    p.add_argument("--batch", type=int, default=0, metavar="N",
                   help="every request a batch of N cached blocks")
    a = p.parse_args(argv)
    if a.mix and a.batch:
        p.error("--mix and --batch are two different loads: pick one")
    result = measure(a.clients, a.requests, parse_size(a.block_size), a.blocks, a.mix, a.batch)
    print(json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 and result["wrong_bytes"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""`lazyfs demo`: build a small real image on the embedded store, run a command in it from a cold
node cache, and show how little of the image the start needed."""
from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

from imagebuilder.build import build
from imagebuilder.ociwriter import TarEntry, make_tar, write_layout
from lazyfs.errors import RunError
from lazyfs.runner.session import RunOptions, run
from lazyfs.source.spec import Source
from lazyfs.store import open_store

TAG = "lazyfs/demo:latest"
APPLETS = ("sh", "cat", "head", "ls", "wc", "echo", "sha256sum", "du")
START = """#!/bin/sh
echo "hello from a lazily loaded container"
cat /etc/os-release
echo "model header: $(head -c 16 /app/model/weights-0.bin | sha256sum | head -c 16)"
echo "files in /app/model: $(ls /app/model | wc -l)"
"""


def _payload(i: int, size: int) -> bytes:
    # Deterministic and poorly compressible, like real weights; same bytes every run (dedup).
    out = bytearray()
    seed = hashlib.sha256(f"lazyfs-demo-{i}".encode()).digest()
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:size])


def demo_layout(work: Path) -> Path:
    busybox = shutil.which("busybox")
    if not busybox:
        raise RunError("the demo image is built from busybox: apt-get install busybox-static")
    d, lnk = tarfile.DIRTYPE, tarfile.SYMTYPE
    base = [TarEntry("bin/", type=d, mode=0o755), TarEntry("etc/", type=d, mode=0o755),
            TarEntry("tmp/", type=d, mode=0o1777),
            TarEntry("bin/busybox", Path(busybox).read_bytes(), mode=0o755),
            TarEntry("etc/os-release", b'NAME="lazyfs demo"\nID=lazyfs-demo\n'),
            TarEntry("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")]
    base += [TarEntry(f"bin/{a}", type=lnk, linkname="busybox", mode=0o777) for a in APPLETS]
    app = [TarEntry("app/", type=d, mode=0o755), TarEntry("app/model/", type=d, mode=0o755),
           TarEntry("app/start.sh", START.encode(), mode=0o755)]
    app += [TarEntry(f"app/model/weights-{i}.bin", _payload(i, 8 * 1024 * 1024)) for i in range(8)]
    config = {"Env": ["PATH=/bin"], "Cmd": ["/app/start.sh"], "WorkingDir": "/"}
    return write_layout(work / "oci", [make_tar(base), make_tar(app)], "latest", config)


def run_demo(store_spec: str | None, runtime: str, say: Callable[[str], None], progress=None) -> int:
    store = open_store(store_spec)
    with tempfile.TemporaryDirectory(prefix="lazyfs-demo-") as tmp:
        work = Path(tmp)
        say(f"[1/3] building {TAG} (busybox base layer + 64 MiB app layer) into {store.url}")
        t0 = time.monotonic()
        result = build(f"oci:{demo_layout(work)}:latest", store, TAG, progress=progress)
        total = sum(e.size for e in result.manifest.entries if e.chunks)
        say(f"      {result.digest} ({len(result.manifest.entries)} entries, "
            f"{total / 2**20:.1f} MiB of files) in {time.monotonic() - t0:.1f} s")
        stats: dict = {}
        say("[2/3] mounting it on an empty node cache and running /app/start.sh in a container")
        t0 = time.monotonic()
        code = run(RunOptions(TAG, [], Source(store.url), str(work / "node-cache"), runtime,
                              report=stats.update, node=False),  # self-contained: no resident agent
                   say=lambda m: say("      " + m))
        elapsed = time.monotonic() - t0
        fetched = stats.get("cache", {}).get("fetched_raw_bytes", 0)
        blocks = stats.get("store", {}).get("block_gets", 0)
        say(f"[3/3] exit code {code} after {elapsed:.2f} s; fetched {fetched / 2**20:.2f} MiB of the "
            f"{total / 2**20:.1f} MiB image ({100 * fetched / max(total, 1):.1f}%) in {blocks} blocks")
        return code

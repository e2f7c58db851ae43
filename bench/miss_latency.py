"""Per-miss latency of the node cache (`python -m bench.miss_latency`): fetch from a local store
(read, inflate, verify) with the block written behind the read (the default) against written
before the read is answered (WRITE_BEHIND = 0, how every miss was served before); 300 blocks of
64 KiB, each way twice, alternating. The disk is this machine's; the page cache is not dropped
(the fsync is what differs)."""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

from lazyfs.cache import landing, nodecache
from lazyfs.format import block
from lazyfs.records import objects
from lazyfs.store.local import LocalStore

BLOCKS, SIZE = 300, 64 * 1024


def main() -> None:
    root = tempfile.mkdtemp(prefix="lazyfs-missbench-")
    try:
        store = LocalStore(os.path.join(root, "store"))
        blobs = []
        for _ in range(BLOCKS):
            data = os.urandom(SIZE)
            digest, frame = block.encode(data)
            store.put_block(digest, frame)
            blobs.append((digest, len(data)))
        default = landing.WRITE_BEHIND
        for label, bound in (("write-behind", default), ("write-first", 0)) * 2:
            landing.WRITE_BEHIND = bound
            cache = nodecache.NodeCache(os.path.join(root, f"cache-{label}-{time.monotonic_ns()}"),
                                        lambda d, n: objects.fetch_block(store, d, n))
            ms = []
            for digest, size in blobs:
                t = time.perf_counter()
                cache.read(digest, size, 0, 4096)
                ms.append((time.perf_counter() - t) * 1000)
            cache.close()
            ms.sort()
            print(f"{label:13s} miss ms: median {statistics.median(ms):.2f}  p90 {ms[int(len(ms) * 0.9)]:.2f}")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

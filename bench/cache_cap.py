"""What keeping startup-profile blocks longer under the node cache's cap buys.

    python -m bench.cache_cap            # cap 8 MiB, app start set 2 MiB, a 24 MiB scan

Two images on one node: ``app`` (a start that reads 8 files of 256 KiB; its startup profile is
recorded with `lazyfs profile`) and ``scan`` (a job that reads 24 MiB of other files). The node
runs app, then scan; then the cache is trimmed to the cap twice over, from two copies of the same
cache directory: once least-recently-used only, once with app's profile blocks last
(lazyfs.cache.cap.trim). app then starts again on each trimmed cache, and the bench counts the
blocks that start fetched. Real images, real runs (namespaces runtime, FUSE data path, so every
read is counted); prints JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.servers import LAZYFS
from lazyfs.cache import cap

MIB = 1 << 20


def _rootfs(root: Path, files: dict[str, int], seed: int) -> Path:
    busybox = shutil.which("busybox")
    if not busybox:
        raise SystemExit("busybox is needed (apt-get install busybox-static)")
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    os.symlink("busybox", root / "bin" / "cat")
    for name, size in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(hashlib.shake_256(f"{seed}-{name}".encode()).digest(size))
    return root


def _lazyfs(env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*LAZYFS, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lazyfs {' '.join(args)}: {proc.stderr.strip()[-800:]}")
    return proc


def main() -> dict:
    limit = 8 * MIB
    with tempfile.TemporaryDirectory(prefix="lazyfs-capbench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "LAZYFS_STORE": str(work / "store"), "LAZYFS_CACHE_DIR": str(work / "cache"),
               "LAZYFS_STATE_DIR": str(work / "state"), "LAZYFS_NODE": "off", "LAZYFS_DATA_PATH": "fuse"}
        app_files = {f"app/lib{i}.so": 256 * 1024 for i in range(8)}
        _rootfs(work / "app", app_files, 1)
        _rootfs(work / "scan", {f"data/part{i}": MIB for i in range(24)}, 2)
        _lazyfs(env, "build", f"dir:{work / 'app'}", "--tag", "cap/app:1")
        _lazyfs(env, "build", f"dir:{work / 'scan'}", "--tag", "cap/scan:1")
        start = ["sh", "-c", "cat /app/* > /dev/null"]
        _lazyfs(env, "profile", "cap/app:1", "--runtime", "namespaces", "--", *start)
        _lazyfs(env, "run", "--runtime", "namespaces", "cap/app:1", "--", *start)
        _lazyfs(env, "run", "--runtime", "namespaces", "cap/scan:1", "--", "sh", "-c", "cat /data/* > /dev/null")
        from lazyfs.records import profiles
        from lazyfs.records import objects
        from lazyfs.store import open_store
        store = open_store(str(work / "store"))
        prof = profiles.load(store, objects.resolve(store, "cap/app:1"))
        keep = [b.digest for b in prof.blocks]
        result = {"cap_bytes": limit, "cache_bytes_before": cap.usage(work / "cache")[1],
                  "profile_blocks": len(keep)}
        for policy, kept in (("lru", ()), ("profile-last", keep)):
            cache = work / f"cache-{policy}"
            shutil.copytree(work / "cache", cache, copy_function=_copy_keeping_times)
            trim = cap.trim(cache, limit, kept)
            stats = work / f"stats-{policy}.json"
            _lazyfs({**env, "LAZYFS_CACHE_DIR": str(cache)}, "run", "--runtime", "namespaces",
                    "--profile", "none", "--stats-json", str(stats), "cap/app:1", "--", *start)
            fetched = json.loads(stats.read_text())["cache"]["misses"]
            result[policy] = {"evicted_files": trim.evicted, "evicted_bytes": trim.evicted_bytes,
                              "app_start_blocks_fetched": fetched}
    print(json.dumps(result, indent=2))
    return result


def _copy_keeping_times(src: str, dst: str) -> None:
    shutil.copy2(src, dst)
    st = os.stat(src)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


if __name__ == "__main__":
    main()

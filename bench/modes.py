"""One timed cold start per call, in each mode the harness compares.

Every mode runs the workload with the same runtime (Linux namespaces + chroot, lazyfs's
`namespaces` runtime) and measures from the moment the node starts working on the image until the
workload is done: its expected line printed, or its HTTP port answering. The node's page cache
is dropped before each run (bench.pagecache: the servers' files are read back in, unless
`--cold-servers`); "cold node" also means an empty node cache.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench.images import Workload
from bench.pagecache import drop_caches
from bench.pull import pull
from bench.servers import LAZYFS
from lazyfs.errors import LazyfsError
from lazyfs.runner import runtime as rt

# warm-node-fuse: warm-node with --data-path fuse, the fallback, for the side-by-side;
# warm-node-podman: warm-node with podman (runc) as the runtime, against podman-image;
# podman-image: `podman run` of the image from containers-storage (a warm podman node);
# podman-pull: `podman pull` from a real registry (Debian's docker-registry, over the bench's link)
# into empty containers-storage of its own, then `podman run`: what users run today on a cold node;
# containerd-pull: a cold containerd node (root of its own, overlayfs snapshotter): a CRI pull from
# the registry over the link, as a kubelet asks for it, then `ctr run`: what Kubernetes runs today;
# containerd-lazy: the same node with `lazyfs snapshotter` (layers served by the bench's cache
# server, an empty node cache, no startup profile, as lazy; the node's agent has served the other
# modes' images);
# local-erofs: the extracted rootfs as an EROFS image on local disk, the kernel's own reference;
# local-overlay: the extracted rootfs under a fresh writable overlay, as every container has one
# (and so every mode starts from the same byte code: nothing a run writes outlives it);
# local: the extracted rootfs itself (what a run writes there, .pyc files, stays for the next).
# What `lazyfs run` says on stderr when a restore fell back to a cold start.
FALLBACK = "lazyfs: warning: starting"
MODES = ("pull", "podman-pull", "containerd-pull", "containerd-lazy", "lazy", "lazy+learnt", "lazy+profile", "warm-node", "warm-node-fuse",
         "warm-node-podman", "podman-image", "local-erofs", "local-overlay", "local")
RUN_TIMEOUT = 600.0
REGISTRY_MODES = ("podman-pull", "containerd-pull", "containerd-lazy")  # need the bench's registry


class BenchRunError(LazyfsError):
    pass


@dataclass
class Sample:
    seconds: float  # start → workload done (the number that matters)
    mount_s: float | None = None  # start → image mounted (lazy modes)
    # Bytes the node received over the link, and the HTTP requests it made (None: not measured,
    # as for podman's and containerd's pulls; 0 for what crosses no link).
    fetched_bytes: int | None = 0
    requests: int | None = 0
    read_bytes: int = 0  # bytes the workload read from the image (FUSE reads; lazy modes)
    phases: dict = field(default_factory=dict)


def _remove_written_since(root: Path, stamp: float) -> None:
    """Byte code a run wrote into an extracted tree (files under __pycache__ newer than
    ``stamp``), and the __pycache__ directories it made."""
    for dirpath, dirs, files in os.walk(root, topdown=False):
        if os.path.basename(dirpath) != "__pycache__":
            continue
        for name in files:
            path = os.path.join(dirpath, name)
            if os.lstat(path).st_mtime >= stamp:
                os.unlink(path)
        if os.lstat(dirpath).st_mtime >= stamp and not os.listdir(dirpath):
            os.rmdir(dirpath)


def _wait_http(port: int, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchRunError(f"the workload exited ({proc.returncode}) before answering on :{port}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.005)
    raise BenchRunError(f"no answer on :{port} within {RUN_TIMEOUT:.0f}s")


def timed(cmd: list[str], work: Workload, t0: float, marks: dict[str, str] | None = None,
          stop_by_kill: bool = False) -> tuple[float, dict]:
    """Run cmd until the workload is done; returns (seconds since t0, {mark: seconds}) where
    marks maps a name to a stderr line prefix to time (e.g. lazyfs run -v's "mounted")."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen: dict[str, float] = {}
    err_tail: list[str] = []

    def watch_stderr() -> None:
        for line in proc.stderr:
            err_tail.append(line)
            del err_tail[:-20]
            for name, prefix in (marks or {}).items():
                if name not in seen and line.startswith(prefix):
                    seen[name] = time.monotonic() - t0
    watcher = threading.Thread(target=watch_stderr, daemon=True)
    watcher.start()
    deadline = time.monotonic() + RUN_TIMEOUT
    done = None
    try:
        if work.http_port:
            _wait_http(work.http_port, proc, deadline)
            done = time.monotonic() - t0
            if stop_by_kill:
                os.killpg(proc.pid, signal.SIGKILL)  # unshare --kill-child takes the namespace down
            else:
                proc.send_signal(signal.SIGTERM)  # lazyfs run stops the container and unmounts
        else:
            for line in proc.stdout:
                if done is None and line.startswith(work.expect):
                    done = time.monotonic() - t0
        code = proc.wait(timeout=60)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        watcher.join(5)
    if done is None or (code != 0 and not work.http_port):
        raise BenchRunError(f"{work.name}: {' '.join(cmd[:3])}… exited {code} without finishing:\n"
                            + "".join(err_tail))
    return done, seen


def _waits(cache: dict) -> dict:
    """Where the mount's reads waited (lazyfs.cache.nodecache.CacheStats): demand misses, each a
    round trip plus inflating and hashing, and waits for blocks already on their way."""
    demand = cache.get("misses", 0) - cache.get("prefetched", 0)
    return {"demand_misses": demand, "demand_s": round(cache.get("demand_us", 0) / 1e6, 3),
            "demand_ms_each": round(cache.get("demand_us", 0) / 1e3 / demand, 2) if demand else None,
            "waits": cache.get("waits", 0), "wait_s": round(cache.get("wait_us", 0) / 1e6, 3)}


class Node:
    """The node side: where its node cache and extracted images live, and how it starts things."""

    def __init__(self, home: Path, server_url: str, store: str, blob_url: str,
                 data_path: str = "auto", registry: str | None = None):
        self.home = home
        self.registry = registry  # HOST:PORT of the bench's docker-registry (podman-pull)
        self.data_path = data_path  # lazyfs run --data-path for the lazy modes
        self.server_url = server_url
        self.store = store
        self.blob_url = blob_url
        self.cold_caches = home / "node-cache-cold"  # a new, empty one for every cold run
        self.warm_cache = home / "node-cache-warm"  # filled once, kept (warm-node)
        self.local = home / "local"

    def lazy(self, ref: str, work: Workload, profile: str, cold: bool,
             data_path: str | None = None, runtime: str = "namespaces") -> Sample:
        cache = self.cold_cache() if cold else self.warm_cache
        if cold:
            self.fresh_agent()
        stats = self.home / "run-stats.json"
        stats.unlink(missing_ok=True)
        cmd = [*LAZYFS, "run", "-v", "--runtime", runtime,
               "--server", self.server_url, "--cache-dir", str(cache), "--profile", profile,
               "--network", "host" if work.http_port else "none", "--stats-json", str(stats),
               "--data-path", data_path or self.data_path, ref, "--", *work.argv]
        drop_caches()
        t0 = time.monotonic()
        seconds, marks = timed(cmd, work, t0, {"mount": "lazyfs: mounted "})
        s = json.loads(stats.read_text()) if stats.exists() else {}
        # Bytes and requests over the link are the server's counters (coldstart._counted).
        return Sample(seconds, marks.get("mount"), 0, 0, s.get("read_bytes", 0),
                      {"data_path": s.get("data_path", "fuse"),
                       "blocks_fetched": s.get("cache", {}).get("misses", 0),
                       "fetched_raw_bytes": s.get("cache", {}).get("fetched_raw_bytes", 0),
                       "prefetch": s.get("prefetch", {}), "waits": _waits(s.get("cache", {}))})

    def fresh_agent(self) -> None:
        """A cold node's agent has seen no image: before a cold run (untimed) a new agent takes
        over from the last (its mounts kept, its memory of tags, configs and manifests not), as
        `lazyfs node --takeover` does on a node, or starts as a node's systemd starts it. Else
        the runs after the first would find the image's manifest verified and its config read."""
        from lazyfs.errors import NodeError
        from lazyfs.node import client

        with open(self.home / "agent.log", "ab") as log:
            agent = subprocess.Popen([*LAZYFS, "node", "--takeover"], stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if client.call("status", autostart=False)["agent"]["pid"] == agent.pid:
                    return
            except (NodeError, OSError):
                pass
            if agent.poll() is not None:
                raise BenchRunError(f"a new node agent exited at start ({agent.returncode}); log "
                                    f"{self.home / 'agent.log'}")
            time.sleep(0.05)
        raise BenchRunError("a new node agent did not take over within 30 s")

    def cold_cache(self) -> Path:
        """An empty node cache no mount has used. Not the last one emptied: the node agent keeps
        an image mounted for a while after its last run (--idle), and a cache directory names the
        shared mount, so a run on the same directory would find the last run's mount up, with
        its daemon's memory of blocks, over a directory emptied underneath it."""
        shutil.rmtree(self.cold_caches, ignore_errors=True)  # (the old mounts serve no one)
        path = self.cold_caches / uuid.uuid4().hex[:12]
        path.mkdir(parents=True)
        return path

    def fill_warm(self, ref: str) -> None:
        """A warm node: one that holds the whole image, every file complete (so the kernel data
        path serves all of it). Mounts the image on the warm cache, reads every file once, and
        waits until the last whole-file object is written."""
        mnt = self.home / "fill-mnt"
        mnt.mkdir(exist_ok=True)
        base = LAZYFS
        subprocess.run([*base, "mount", "--server", self.server_url, "--cache-dir",
                        str(self.warm_cache), "--profile", "none", ref, str(mnt)], check=True,
                       capture_output=True)
        try:
            for dirpath, _, files in os.walk(mnt):
                for name in files:
                    path = os.path.join(dirpath, name)
                    if os.path.isfile(path) and not os.path.islink(path):
                        with open(path, "rb") as f:
                            while f.read(1 << 20):
                                pass
            last, settled = None, time.monotonic()
            while time.monotonic() - settled < 3:  # the completer writes objects after the reads
                # `lazyfs stats`, not the control socket: through the node agent, the mount here
                # is a bind of the agent's shared mount, whose daemon answers for that one.
                n = json.loads(subprocess.run([*base, "stats", str(mnt)], check=True, capture_output=True,
                                              text=True).stdout).get("complete", {}).get("objects_written")
                if n != last:
                    last, settled = n, time.monotonic()
                time.sleep(0.2)
        finally:
            subprocess.run([*base, "umount", str(mnt)], capture_output=True)

    def restore(self, snap: str, ref: str, work: Workload, *flags: str) -> Sample:
        """Restore a snapshot on a cold node (empty node cache, page cache dropped); ``flags``
        pick eager or lazy (`lazyfs run --eager/--lazy/--no-working-set`, or `--store` for the
        untimed first restore that publishes the working set it records)."""
        cmd = [*LAZYFS, "run", "-v", *flags, "--restore", snap,
               "--server", self.server_url, "--cache-dir", str(self.cold_cache()), ref]
        self.fresh_agent()
        drop_caches()
        t0 = time.monotonic()
        seconds, marks = timed(cmd, work, t0, {"fallback": FALLBACK,
                                               "resumed": "lazyfs: restored "})
        if "fallback" in marks:
            raise BenchRunError(f"restore of {snap} fell back to a cold start")
        return Sample(seconds, phases={"resumed_s": round(marks.get("resumed", 0.0), 3)})

    def pull(self, tag: str, work: Workload) -> Sample:
        # The last run's tree goes before the clock (pull() would delete it on it: some 2 s of
        # a torch pull).
        shutil.rmtree(self.home / "pull", ignore_errors=True)
        drop_caches()
        t0 = time.monotonic()
        result = pull(self.blob_url, tag, self.home / "pull")
        seconds, _ = timed(self._local_cmd(result.rootfs, work), work, t0, stop_by_kill=True)
        return Sample(seconds, None, result.bytes, result.requests, 0,
                      {"download_s": round(result.download_s, 3), "extract_s": round(result.extract_s, 3),
                       "run_s": round(seconds - result.download_s - result.extract_s, 3)})

    def ensure_local(self, tag: str) -> Path:
        """The image extracted to local disk once (the `local` floor reuses it)."""
        rootfs = self.local / tag / "bundle" / "rootfs"
        if not rootfs.is_dir():
            pull(self.blob_url, tag, self.local / tag)
        return rootfs

    def local_run(self, tag: str, work: Workload) -> Sample:
        """The workload in the extracted tree itself. What it writes there (Python's .pyc files)
        is removed after each run, so every run, as in every other mode, starts from the image's
        own byte code: a run that compiles pays for it each time, not only the first time."""
        rootfs = self.ensure_local(tag)
        stamp = time.time()
        drop_caches()
        t0 = time.monotonic()
        try:
            seconds, _ = timed(self._local_cmd(rootfs, work), work, t0, stop_by_kill=True)
        finally:
            _remove_written_since(rootfs, stamp)
        return Sample(seconds)

    def local_erofs_run(self, tag: str, work: Workload) -> Sample:
        """The extracted rootfs as an EROFS image (mkfs.erofs, made once) mounted from its file:
        what the kernel's own read-only filesystem gives on this disk, the reference the kernel
        data path is measured against. The mount is not timed, as `local` does not time the
        extraction."""
        from lazyfs.fs import kernel
        from lazyfs.proc import syscalls

        rootfs = self.ensure_local(tag)
        image = self.local / tag / "rootfs.erofs"
        if not image.exists():
            subprocess.run(["mkfs.erofs", "--quiet", "--preserve-mtime", str(image) + ".part", str(rootfs)], check=True,
                           capture_output=True)
            os.rename(str(image) + ".part", image)
        lower = self.local / tag / "erofs-lower"
        lower.mkdir(exist_ok=True)
        kernel.mount_one(str(image), str(lower), "erofs", syscalls.MS_RDONLY, None)
        try:
            return self._overlay_run(lower, tag, work)
        finally:
            kernel.unmount_one(str(lower), lazy=True)

    def local_overlay_run(self, tag: str, work: Workload) -> Sample:
        """The extracted rootfs under a fresh writable overlay: what a container on local disk
        gets, and the floor the warm node is held to."""
        return self._overlay_run(self.ensure_local(tag), tag, work)

    def _overlay_run(self, lower: Path, tag: str, work: Workload) -> Sample:
        """A run on ``lower`` under a writable layer made for this run alone, as every container
        (and `lazyfs run`) has one; the overlay mount is not timed."""
        from lazyfs.fs import kernel

        base = self.local / tag / "overlay-run"
        shutil.rmtree(base, ignore_errors=True)
        upper, work_dir, root = (base / d for d in ("upper", "work", "rootfs"))
        for d in (upper, work_dir, root):
            d.mkdir(parents=True)
        kernel.mount_one("overlay", str(root), "overlay", 0,
                         f"lowerdir={kernel.escape(lower)},upperdir={upper},workdir={work_dir}")
        try:
            drop_caches()
            t0 = time.monotonic()
            seconds, _ = timed(self._local_cmd(root, work), work, t0, stop_by_kill=True)
        finally:
            kernel.unmount_one(str(root), lazy=True)
            shutil.rmtree(base, ignore_errors=True)
        return Sample(seconds)

    @staticmethod
    def _local_cmd(rootfs: Path, work: Workload) -> list[str]:
        spec = rt.Spec(argv=work.argv, network="host" if work.http_port else "none")
        return rt.namespaces_command(rootfs, spec)

"""The agent's Prometheus metrics, served at ``/metrics`` on a local port, and the counts it keeps
for them and for `lazyfs node status` (runs forked or not; containerd layers served lazily or not).

Scrapes are answered on a thread of their own, one connection at a time: one small HTTP/1.0
exchange each, bounded in size and in total time (SCRAPE_DEADLINE). Never on the agent's loop, and
never with its lock held while a client is read: the port is open to every local user, and a
client that sends its request a byte at a time must not hold up a single run. Only the copy of
the agent's state a scrape reports is taken under the lock; the mounts' daemons are asked outside it.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("lazyfs.node")
SCRAPE_DEADLINE = 2.0  # seconds a scrape's client has to send its request and read the answer


@dataclass
class RunCounts:
    """How `lazyfs run`s reached the agent: forked warm, or fell back to the full CLI (slower)."""
    forked: int = 0
    fallbacks: int = 0
    last_fallback: str = ""  # why, for `lazyfs node status`
    forker_starts: int = 0


@dataclass
class SnapshotCounts:
    """Layers the containerd snapshotter (lazyfs.snapshotter) served lazily, or left to containerd
    to download and unpack because the store lacks them (the fallback, never silent)."""
    lazy: int = 0
    fallbacks: int = 0
    last_fallback: str = ""  # the chain ID, for `lazyfs node status`


class Metrics:
    def __init__(self, agent):
        self.agent = agent
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lazyfs_node_requests", "Requests to the agent", ["op"], registry=r)
        self.mounts = Counter("lazyfs_node_mounts", "Shared mounts made", registry=r)
        self.reuses = Counter("lazyfs_node_mount_reuses", "Users given a mount already up", registry=r)
        self.unmounts = Counter("lazyfs_node_unmounts", "Idle shared mounts unmounted", registry=r)
        self.mount_seconds = Histogram("lazyfs_node_mount_seconds", "Time to mount an image", registry=r)
        self.unmount_seconds = Histogram("lazyfs_node_unmount_seconds", "Time to unmount an idle image",
                                         registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5))
        self.last_counters: dict[str, dict] = {}  # shared key → its daemon's counters, last asked
        self.retired: dict[str, tuple[int, int]] = {}  # cache dir → (hits, misses) of mounts gone
        r.register(_Live(self))
        self.listener: socket.socket | None = None
        self.address: str | None = None

    def start(self) -> None:
        spec = self.agent.opts.metrics
        if not spec:
            return
        host, _, port = spec.rpartition(":")
        try:
            sock = socket.create_server((host or "127.0.0.1", int(port)))
        except (OSError, ValueError) as exc:
            log.warning("metrics: cannot listen on %s (%s); serving none", spec, exc)
            return
        self.listener = sock
        self.address = "%s:%d" % sock.getsockname()[:2]
        threading.Thread(target=self._serve_all, args=(sock,), name="metrics", daemon=True).start()
        log.info("metrics on http://%s/metrics", self.address)

    def snapshot(self, shared) -> None:
        """Ask a mount's daemon for its counters now (before an unmount takes it away)."""
        from lazyfs.fs import control
        from lazyfs.errors import MountError
        try:
            self.last_counters[shared.key] = control.query(shared.mountpoint, timeout=control.SCRAPE_TIMEOUT)
        except MountError:
            pass

    def retire(self, shared) -> None:
        """Keep an unmounted image's last counters in its cache's hit ratio."""
        c = self.last_counters.pop(shared.key, {}).get("cache", {})
        hits, misses = self.retired.get(shared.options["cache_dir"], (0, 0))
        self.retired[shared.options["cache_dir"]] = (hits + c.get("hits", 0), misses + c.get("misses", 0))

    def stop(self) -> None:
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept()
            except OSError:
                pass
            self.listener.close()

    def _serve_all(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the agent stops
                return
            with conn:
                try:
                    self._answer(conn, time.monotonic() + SCRAPE_DEADLINE)
                except OSError:
                    pass
                except Exception:  # a scrape's trouble is not the node's
                    log.exception("metrics: answering a scrape failed")

    def _answer(self, conn: socket.socket, deadline: float) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 8192:
            left = deadline - time.monotonic()
            if left <= 0:
                return  # too slow to ask: dropped, whatever it sent
            conn.settimeout(left)
            chunk = conn.recv(4096)
            if not chunk:
                break
            head += chunk
        path = head.split(b" ")[1] if head.count(b" ") >= 2 else b""
        if path.split(b"?")[0] == b"/metrics":
            body, status = generate_latest(self.registry), b"200 OK"
        else:
            body, status = b"see /metrics\n", b"404 Not Found"
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        conn.sendall(b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Live:
    """What is true now, asked at scrape time: images, users, cache use and hits."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        from lazyfs.fs import control
        from lazyfs.errors import MountError
        agent = self.metrics.agent
        images = GaugeMetricFamily("lazyfs_node_images", "Shared mounts up")
        users = GaugeMetricFamily("lazyfs_node_users", "Leases on shared mounts", labels=["kind"])
        hits = GaugeMetricFamily("lazyfs_node_cache_hits", "Cache hits of the mounts up", labels=["image"])
        misses = GaugeMetricFamily("lazyfs_node_cache_misses", "Blocks fetched by the mounts up", labels=["image"])
        with agent.lock:  # (held only to copy: the daemons are asked without it)
            shared = [(s.key, s.ref, s.mountpoint, [x.kind for x in s.leases]) for s in agent.shared.values()]
            runs, snapshots = dataclasses.replace(agent.runs), dataclasses.replace(agent.snapshots)
        images.add_metric([], len(shared))
        kinds = {"run": 0, "mount": 0, "snapshot": 0}
        for key, ref, mountpoint, leases in shared:
            for kind in leases:
                kinds[kind] = kinds.get(kind, 0) + 1
            try:
                counters = control.query(mountpoint, timeout=control.SCRAPE_TIMEOUT)
            except MountError:
                continue
            self.metrics.last_counters[key] = counters
            c = counters.get("cache", {})
            hits.add_metric([ref], c.get("hits", 0))
            misses.add_metric([ref], c.get("misses", 0))
        for kind, n in kinds.items():
            users.add_metric([kind], n)
        forked = CounterMetricFamily("lazyfs_node_forked_runs", "`lazyfs run`s forked warm by the agent")
        forked.add_metric([], runs.forked)
        slow = CounterMetricFamily("lazyfs_node_run_fallbacks", "`lazyfs run`s the agent could not fork, "
                                   "which took the full CLI's slower path (the agent's log says why)")
        slow.add_metric([], runs.fallbacks)
        starts = CounterMetricFamily("lazyfs_node_forker_starts", "Fork servers started (1 + restarts)")
        starts.add_metric([], runs.forker_starts)
        layers = CounterMetricFamily("lazyfs_node_snapshot_layers", "Layers containerd asked the "
                                     "lazyfs snapshotter for: served lazily, or unpacked by containerd "
                                     "because the store lacks them (fallback)", labels=["result"])
        layers.add_metric(["lazy"], snapshots.lazy)
        layers.add_metric(["fallback"], snapshots.fallbacks)
        yield from (images, users, hits, misses, forked, slow, starts, layers)

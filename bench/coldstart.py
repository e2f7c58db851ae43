"""`lazyfs bench`: cold starts of real workloads in every mode, over an emulated link.

Outside the link: build the images (cached) and publish them to the bench store. Inside it (a
network namespace with a tbf-shaped loopback, see bench.link): a `lazyfs serve` cache server in
front of the store and a blob server for the pull baseline, both adding the same per-request
latency; then, for each run, each mode in turn, so drift hits all modes alike.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import competitors, report
from bench.images import SNAPSHOT_BASELINES, SNAPSHOT_MODES, SNAPSHOT_WORKLOADS, WORKLOADS, Images
from bench.link import Link
from bench.modes import MODES, REGISTRY_MODES, BenchRunError, Node, Sample
from bench import pagecache
from bench.servers import LAZYFS
from lazyfs.errors import LazyfsError

SERVER_PORT, BLOB_PORT = 17070, 17071


@dataclass
class BenchConfig:
    workloads: list[str]
    modes: list[str] = field(default_factory=lambda: list(MODES))
    runs: int = 5
    link: str = "1gbit"
    delay: float = 0.001  # seconds per request: the emulated round trip
    home: Path = Path.home() / ".cache" / "lazyfs" / "bench"
    out: Path = Path("bench-results")
    data_path: str = "auto"  # lazyfs run --data-path of the lazy modes (warm-node-fuse: fuse)
    # the modes named (-m) that the snapshot workloads run too, beside their own (SNAPSHOT_BASELINES)
    baselines: list[str] = field(default_factory=list)
    cold_servers: bool = False  # drop the servers' page cache before each run too (bench.pagecache)

    def snapshot_modes(self) -> tuple[str, ...]:
        return SNAPSHOT_MODES + tuple(m for m in SNAPSHOT_BASELINES if m in self.baselines)


def _lazyfs(*args: str) -> str:
    proc = subprocess.run([*LAZYFS, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LazyfsError(f"lazyfs {' '.join(args[:2])} failed: {proc.stderr.strip()[-800:]}")
    return proc.stdout


def _publish(images: Images, store: Path, name: str) -> dict:
    """Build the image into the bench store once (again if it was built before builds tagged
    its layer chains, which the containerd snapshotter finds it by); return its sizes."""
    from lazyfs.format import chain as chainfmt
    from lazyfs.store import open_store
    ref = f"bench/{name}:latest"
    tags = {(n, t): d for n, t, d in open_store(str(store)).list_tags()} if store.exists() else {}
    digest = tags.get(tuple(ref.rsplit(":", 1)))
    if digest is None or not any(n == chainfmt.TAG_NAME and d == digest for (n, _), d in tags.items()):
        _lazyfs("build", f"oci:{images.layout}:{name}", "--tag", ref, "--store", str(store))
    info = json.loads(_lazyfs("inspect", ref, "--store", str(store), "--json"))
    index = json.loads((images.layout / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == name)
    manifest = json.loads((images.layout / "blobs" / "sha256" / desc["digest"][7:]).read_bytes())
    return {"ref": ref, "files": info["files"], "bytes": info["bytes"],
            "layers": len(manifest["layers"]),
            "compressed_bytes": sum(layer["size"] for layer in manifest["layers"])}


class Servers:
    """The cache server and the blob server, started inside the link."""

    def __init__(self, cfg: BenchConfig, store: Path, layout: Path):
        self.procs: list[subprocess.Popen] = []
        self.log = open(cfg.home / "servers.log", "ab")
        delay = str(cfg.delay)
        self._start([*LAZYFS, "serve", "--store", str(store), "--listen",
                     f"127.0.0.1:{SERVER_PORT}", "--cache-dir", str(cfg.home / "server-cache"),
                     "--cache-size", "64G", "--delay", delay, "--no-access-log"],
                    f"http://127.0.0.1:{SERVER_PORT}/healthz")
        self._start([sys.executable, "-m", "bench.blobserver", str(layout), "--port", str(BLOB_PORT),
                     "--delay", delay], f"http://127.0.0.1:{BLOB_PORT}/oci-layout")
        self.url = f"http://127.0.0.1:{SERVER_PORT}"
        self.blob_url = f"http://127.0.0.1:{BLOB_PORT}"

    def _start(self, cmd: list[str], probe: str) -> None:
        proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(probe, timeout=1).read()
                return
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise LazyfsError(f"{cmd[2:4]} did not start; see {self.log.name}")

    def counters(self) -> tuple[int, int]:
        """(requests answered, body bytes sent) so far: what nodes took over the link."""
        text = urllib.request.urlopen(self.url + "/metrics", timeout=5).read().decode()
        lines = text.splitlines()

        def total(prefix: str) -> int:
            # (not the scrapes of /metrics: the bench's own, one of which lands in every sample)
            return int(sum(float(line.split()[-1]) for line in lines
                           if line.startswith(prefix) and 'route="/metrics"' not in line))
        return total("lazyfs_server_requests_total{"), total("lazyfs_server_response_bytes_total{")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.log.close()


def run(cfg: BenchConfig, progress=None, say=lambda m: None) -> dict:
    unknown = set(cfg.workloads) - set(WORKLOADS) | set(cfg.modes) - set(MODES)
    if unknown:
        raise LazyfsError(f"unknown workload or mode: {', '.join(sorted(unknown))}")
    cfg.home.mkdir(parents=True, exist_ok=True)
    images = Images(cfg.home, say)
    store = cfg.home / "store"
    image_info = {}
    for name in dict.fromkeys(WORKLOADS[w].image for w in cfg.workloads):
        images.ensure(name)
        image_info[name] = _publish(images, store, name)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results: dict = {"date": started, "machine": _machine(), "link": {"rate": cfg.link,
                     "delay_ms": cfg.delay * 1000}, "runs": cfg.runs, "images": image_info,
                     "workloads": {}}
    total = sum(len(cfg.snapshot_modes() if w in SNAPSHOT_WORKLOADS else cfg.modes)
                for w in cfg.workloads) * cfg.runs
    tick = progress.task("cold starts", total) if progress else (lambda n: None)
    # What the servers serve from stays in the page cache across the node's drops, unless asked
    # otherwise (bench.pagecache): the store's tags and records (the cache server reads tags on
    # every request), the registry's storage, the blob server's layout, then the cache server's
    # blocks. The origin store's blocks do not: a cache server reads them only on a miss.
    kept = [] if cfg.cold_servers else [store / "tags", store / "manifests", cfg.home / "registry",
                                        images.layout, cfg.home / "server-cache"]
    with Link(cfg.link) as link, _private_node(cfg.home), _registry(cfg, images, say) as registry, \
            pagecache.servers_kept(kept):
        results["link"]["where"] = link.describe()
        servers = Servers(cfg, store, images.layout)
        try:
            node = Node(cfg.home, servers.url, str(store), servers.blob_url, cfg.data_path,
                        registry.host if registry else None)
            for w in cfg.workloads:
                results["workloads"][w] = _bench_workload(cfg, node, servers, w, tick, say)
        finally:
            servers.stop()
    results["servers_page_cache"] = "dropped" if cfg.cold_servers else \
        "kept" if not pagecache.cut_short else f"kept, up to {pagecache.MAX_READ_BACK >> 30} GiB"
    results["summary"] = {w: report.summarise(r) for w, r in results["workloads"].items()}
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    (cfg.out / "results.md").write_text(report.markdown(results))
    report.plot(results, cfg.out / "results.png")
    return results


@contextmanager
def _registry(cfg: BenchConfig, images: Images, say):
    """For podman-pull and the containerd modes: Debian's docker-registry inside the link's
    namespace (started after the harness entered it), holding the workloads' images as skopeo
    pushes them (gzip layers)."""
    wanted = [m for m in cfg.modes if m in REGISTRY_MODES]
    if not wanted:
        yield None
        return
    from bench.registry import RegistryServer, skip_reason
    if skip_reason():
        raise LazyfsError(f"{wanted[0]}: {skip_reason()}")
    registry = RegistryServer(cfg.home / "registry").start()
    try:
        for name in dict.fromkeys(WORKLOADS[w].image for w in cfg.workloads):
            say(f"pushing {name} to the bench registry ({', '.join(wanted)})")
            registry.push(f"oci:{images.layout}:{name}", f"bench/{name}:latest")
        yield registry
    finally:
        registry.stop()


@contextmanager
def _private_node(home: Path):
    """The bench's own node agent, as a node would have one: started on first use inside the
    bench's network namespace (so it reaches the bench's servers), with its own socket and state,
    and stopped at the end. The machine's own agent, if one runs, is never touched."""
    env = {"LAZYFS_NODE": "auto", "LAZYFS_NODE_SOCKET": str(home / "node.sock"),
           "LAZYFS_STATE_DIR": str(home / "state"), "LAZYFS_NODE_METRICS": "off"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        pidfile = home / "state" / "node" / "agent.pid"
        try:
            pid = int(pidfile.read_text())
            os.kill(pid, signal.SIGTERM)
            for _ in range(200):  # it unmounts what no container uses, then exits
                os.kill(pid, 0)
                time.sleep(0.05)
        except (OSError, ValueError):
            pass
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _bench_workload(cfg: BenchConfig, node: Node, servers: Servers, w: str, tick, say) -> dict:
    work = WORKLOADS[w]
    ref = f"bench/{work.image}:latest"
    if w in SNAPSHOT_WORKLOADS:
        return _bench_snapshot(cfg, node, servers, work, ref, tick, say)
    samples: dict[str, list[dict]] = {m: [] for m in cfg.modes}
    if "lazy+learnt" in cfg.modes:  # first: the image's first start anywhere has no profile
        say(f"{w}: one cold start on another node, which learns its startup profile")
        _learn_profile(node, ref, work)
    if "lazy+profile" in cfg.modes:
        say(f"{w}: recording its startup profile")
        _record_profile(node, ref, work)
    if {"warm-node", "warm-node-fuse", "warm-node-podman"} & set(cfg.modes):
        say(f"{w}: filling the warm node cache with the whole image")
        node.fill_warm(ref)
    if {"local", "local-erofs", "local-overlay"} & set(cfg.modes):
        node.ensure_local(work.image)
    for i in range(cfg.runs):
        for mode in cfg.modes:
            say(f"{w}: {mode} run {i + 1}/{cfg.runs}")
            samples[mode].append(asdict(_counted(servers, lambda: _one(node, mode, ref, work),
                                                 mode in _LAZY or mode == "containerd-lazy")))
            tick(1)
    return {"image": work.image, "argv": work.argv, "samples": samples}


def _counted(servers: Servers, measure, through_server: bool) -> Sample:
    before = servers.counters()
    sample = measure()
    if through_server:
        after = servers.counters()
        sample.requests, sample.fetched_bytes = after[0] - before[0], after[1] - before[1]
    return sample


def _bench_snapshot(cfg: BenchConfig, node: Node, servers: Servers, work, ref: str, tick, say) -> dict:
    """Cold init (lazy, with the startup profile the fleet learnt for the program) versus
    restoring a snapshot taken right after init, eagerly and lazily, all on a cold node over the
    link."""
    snap = f"bench/{work.name}-warm:latest"
    say(f"{work.name}: taking the snapshot (CRIU)")
    _lazyfs("run", "--snapshot", snap, "--store", node.store, "--server", node.server_url,
            "--cache-dir", str(node.home / "node-cache-profile"), ref, "--", *work.argv)
    say(f"{work.name}: a first lazy restore records the working set")
    node.restore(snap, ref, work, "--lazy", "--store", node.store)
    # The cold init a restore replaces is the fleet's steady state: the program's startup profile
    # learnt by an earlier start, as a fleet that has run it before has it.
    say(f"{work.name}: one cold start on another node, which learns its startup profile")
    _learn_profile(node, ref, work)
    modes = cfg.snapshot_modes()
    samples: dict[str, list[dict]] = {m: [] for m in modes}
    flags = {"restore": ("--eager",), "lazy-restore": ("--lazy", "--no-working-set"),
             "lazy-restore+ws": ("--lazy",)}
    def measure(mode: str) -> Sample:
        if mode in flags:
            return node.restore(snap, ref, work, *flags[mode])
        if mode == "cold-init":
            return node.lazy(ref, work, "auto", cold=True)
        return _one(node, mode, ref, work)  # what users run today: pulled and started cold

    for i in range(cfg.runs):
        for mode in modes:
            say(f"{work.name}: {mode} run {i + 1}/{cfg.runs}")
            samples[mode].append(asdict(_counted(servers, lambda: measure(mode),
                                                 mode not in SNAPSHOT_BASELINES)))
            tick(1)
    return {"image": work.image, "argv": ["python3", "-c", f"<import torch; {work.about}>"], "samples": samples}


# What each mode runs: from the extracted image (the image's name), or lazily (its reference).
_LOCAL = {"pull": Node.pull, "podman-pull": competitors.podman_pull_run,
          "containerd-pull": lambda node, tag, work: competitors.containerd_run(node, tag, work, lazy=False),
          "containerd-lazy": lambda node, tag, work: competitors.containerd_run(node, tag, work, lazy=True),
          "local": Node.local_run,
          "local-erofs": Node.local_erofs_run, "local-overlay": Node.local_overlay_run,
          "podman-image": competitors.podman_image_run}
_LAZY = {  # profile (None: the image's own reference, i.e. what `lazyfs profile` recorded), cold, more
    "warm-node-podman": ("auto", False, {"runtime": "podman"}),
    "warm-node": ("auto", False, {}),
    "warm-node-fuse": ("auto", False, {"data_path": "fuse"}),
    "lazy+profile": (None, True, {}),
    "lazy+learnt": ("auto", True, {}),  # the profile of this workload the fleet learnt
    "lazy": ("none", True, {}),  # the image's first start anywhere
}


def _one(node: Node, mode: str, ref: str, work) -> Sample:
    if mode in _LOCAL:
        return _LOCAL[mode](node, work.image, work)
    profile, cold, more = _LAZY[mode]
    return node.lazy(ref, work, profile or ref, cold=cold, **more)


def _learn_profile(node: Node, ref: str, work, timeout: float = 120.0) -> None:
    """A first cold start with nothing named: its mount learns the workload's startup profile and
    contributes it through the cache server. Waits until the store has it."""
    from lazyfs.errors import NotFound
    from lazyfs.format import profile as proffmt
    from lazyfs.records import objects
    from lazyfs.store import open_store

    store = open_store(node.store)
    image = objects.resolve(store, ref)
    target = proffmt.tag_for(image, proffmt.workload_key(list(work.argv)))
    # The bench's store keeps earlier benches' profiles: this start must find none, as the
    # image's first start anywhere does. (The bench owns that directory store; stores have no
    # tag deletion.)
    for name, tag in (target, proffmt.tag_for(image)):
        (Path(node.store) / "tags" / name / f":{tag}").unlink(missing_ok=True)
    node.lazy(ref, work, "auto", cold=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.get_tag(*target)
            return
        except NotFound:
            if time.monotonic() > deadline:
                raise BenchRunError(f"{ref}: no startup profile learnt within {timeout:.0f} s") from None
            time.sleep(0.5)


def _record_profile(node: Node, ref: str, work) -> None:
    cache = node.home / "node-cache-profile"
    args = ["profile", "--runtime", "namespaces", "--store", node.store, "--server", node.server_url,
            "--cache-dir", str(cache)]
    if work.http_port:
        args += ["--network", "host", "--duration", "20s"]  # a server never exits by itself
    _lazyfs(*args, ref, "--", *work.argv)


def _machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version()}

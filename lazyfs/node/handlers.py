"""What the agent answers: one function per request (``op_NAME``), plus its periodic checks.

Requests: ``hello``, ``acquire`` (a lease on an image's shared mount, mounting it for the first
user), ``release``, ``bind``/``unbind`` (`lazyfs mount`/`umount` through the agent), ``status``,
``handoff`` (an upgrade: leave everything mounted and exit), ``exec`` (lazyfs.node.zygote),
``snapshotter`` (the containerd snapshotter counting a lazy or fallback layer).

Each runs on one of the agent's pool threads with ``agent.lock`` held, and lets go of it only
around slow work (``agent.unlocked()``). A request that lacks a field, or has one of the wrong
type, is answered with one line naming it (``_field``), never with a Python exception's repr.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict

from lazyfs import argv, paths
from lazyfs.cache import layout as cachelayout
from lazyfs.errors import FormatError, LazyfsError, MountError, NodeError
from lazyfs.format import manifest as mf, profile as proffmt
from lazyfs.fs import control, kernel, mounts
from lazyfs.proc import syscalls
from lazyfs.node import table
from lazyfs.node.table import Lease, Shared
from lazyfs.source.spec import Source
from lazyfs.records import objects

log = logging.getLogger("lazyfs.node")


def op_hello(agent, req, pid, conn, reader) -> dict:
    return {"pid": os.getpid(), "socket": str(agent.opts.socket), "on_demand": agent.opts.on_demand}


def op_handoff(agent, req, pid, conn, reader) -> dict:
    log.info("handing over to a new agent (pid %d); leaving %d mount(s) up", pid, len(agent.shared))
    agent.handoff = agent.stopping = True
    return {}


def _field(req: dict, name: str, kind: type = str, default=None):
    """``req[name]`` if it is a ``kind``; the default if absent and there is one; else NodeError."""
    value = req.get(name, default)
    if value is None and default is None:
        raise NodeError(f"request {str(req.get('op'))[:40]!r} lacks the field {name!r}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise NodeError(f"request {str(req.get('op'))[:40]!r}: field {name!r} must be a {kind.__name__}")
    return value


def _source(args: list) -> Source:
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise NodeError("request: field 'source' must be a list of strings")
    p = argv.Parser(add_help=False, exit_on_error=False)
    Source.add_arguments(p)
    try:
        return Source.from_namespace(p.parse_args([str(a) for a in args]))
    except (argparse.ArgumentError, SystemExit) as exc:
        raise NodeError(f"bad source in request: {exc}") from None


def _reader(agent, source: Source):
    """The agent's open store or fleet for ``source`` (opened once, shared by threads)."""
    key = tuple(source.args())
    reader = agent.readers.get(key)
    if reader is None:
        with agent.unlocked():
            opened = source.open()
        reader = agent.readers.setdefault(key, opened)
        if reader is not opened:  # another request opened it meanwhile
            opened.close()
    return reader


def _resolve(agent, source: Source, ref: str) -> tuple[str, dict]:
    """The manifest digest and config of ``ref``, from the agent's open store or fleet (kept open
    when this fails: other requests may be using it, and its clients drop broken connections
    themselves)."""
    reader = _reader(agent, source)

    def fetch() -> tuple[str, dict]:  # (without the lock)
        digest = objects.resolve(reader, ref)
        config = agent.configs.get(digest)
        if config is None:
            raw = objects.read_manifest_bytes(reader, digest)
            config = mf.decode_config(objects.as_image(digest, raw))
            agent.manifests.put(digest, raw)  # for the daemon that mounts it (no second fetch)
        return digest, config

    # Requests for one image at once (pods of one cold image) ask the server once.
    digest, config = agent.resolving.do((tuple(source.args()), ref), fetch)
    agent.configs[digest] = config
    return digest, config


def op_acquire(agent, req, pid, conn, reader) -> dict:
    source = _source(req.get("source") or [])
    ref = _field(req, "ref")
    kind = _field(req, "kind", default="run")
    if kind not in table.LEASE_KINDS:
        raise NodeError(f"request 'acquire': kind must be one of {', '.join(table.LEASE_KINDS)}, "
                        f"not {kind[:40]!r}")
    options = {"source": source.args(),
               "cache_dir": os.path.abspath(_field(req, "cache_dir", default=str(paths.default_cache_dir()))),
               "data_path": _field(req, "data_path", default="auto"),
               "profile": _field(req, "profile", default="auto"),
               "complete": _field(req, "complete", bool, default=False), "cache_size": agent.opts.cache_size}
    target = _field(req, "target", default="")
    workload = req.get("workload")
    if workload is not None:
        try:
            proffmt.check_workload(workload)
        except FormatError as exc:
            raise NodeError(f"request 'acquire': {exc}") from None
    digest, config = _resolve(agent, source, ref)
    shared, mounted = _shared(agent, digest, ref, options, source, config, workload)
    # A snapshot asking again (after a restart of either side) keeps its one lease.
    lease = next((x for x in shared.leases if kind == x.kind == "snapshot" and x.target == target), None)
    if lease is None:
        lease = Lease.new(kind, pid if kind == "run" else 0, target)
        agent.leases.add(shared, lease)
    return {"lease": lease.id, "digest": digest, "mountpoint": shared.mountpoint, "config": config,
            "layout": shared.layout, "daemon_pid": shared.daemon_pid, "mounted": mounted,
            "data_layers": mounts.data_layers(shared.mountpoint)}


def _shared(agent, digest: str, ref: str, options: dict, source: Source,
            config: dict, workload: str | None = None) -> tuple[Shared, bool]:
    """The live shared mount for these options, and whether this request had to mount it. The
    workload that mounts it is the one whose startup profile the mount prefetches and learns."""
    k = table.key(digest, options)
    while (busy := agent.mounting.get(k)) is not None:  # another request is mounting it: wait
        with agent.unlocked():
            busy.wait()
    shared = agent.shared.get(k)
    if shared is not None and not mounts.is_stale(shared.mountpoint) and mounts.mount_entry(shared.mountpoint):
        agent.metrics.reuses.inc()
        return shared, False
    kept: list[Lease] = []
    if shared is not None:  # its daemon died: the users it had get errors; new users get a new mount
        log.warning("%s: shared mount %s died; mounting it again", ref, shared.mountpoint)
        mounts.clean_stale(shared.mountpoint)
        agent.shared.pop(k, None)
        # A containerd snapshot outlives any one mount of its lower: its lease moves to the new one.
        kept = [x for x in shared.leases if x.kind == "snapshot"]
    mnt = table.mounts_dir() / k
    mnt.mkdir(parents=True, exist_ok=True)
    logs = paths.node_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    reader = _reader(agent, source)
    done = agent.mounting[k] = threading.Event()
    try:
        with agent.unlocked(), _removed_on_failure(mnt):
            state = mounts.mount(digest, str(mnt), source, options["cache_dir"], str(logs / f"{k}.log"),
                                 checked=True, profile=options["profile"], data_path=options["data_path"],
                                 complete=options["complete"], cache_size=options["cache_size"],
                                 forker=agent.forker, workload=workload,
                                 manifest=agent.manifests.get(digest))
            blocks = _profile_blocks(agent, reader, digest, options, workload)
    finally:
        del agent.mounting[k]
        done.set()
    agent.metrics.mounts.inc()
    agent.metrics.mount_seconds.observe(time.monotonic() - t0)
    shared = Shared(k, digest, ref, options, str(mnt), state.pid, state.layout, config,
                    mounted_at=time.time(), profile_blocks=blocks)
    agent.shared[k] = shared
    for lease in kept:
        agent.leases.add(shared, lease)
    log.info("%s (%s): mounted on %s in %.3f s (%s data path)", ref, digest[:19], mnt,
             time.monotonic() - t0, state.layout)
    return shared, True


@contextmanager
def _removed_on_failure(mountpoint):
    """A mount that failed leaves no empty mountpoint behind."""
    try:
        yield
    except BaseException:
        try:
            os.rmdir(mountpoint)
        except OSError:
            pass
        raise


def _profile_blocks(agent, reader, digest: str, options: dict, workload: str | None) -> list[str]:
    """The startup profile's blocks, kept longest under the cache cap (a preference: a profile
    that cannot be read now only means none is preferred)."""
    if not agent.opts.cache_size or options["profile"] == "none":
        return []
    from lazyfs.records import profiles
    try:
        prof = profiles.load(reader, digest, options["profile"], workload)
    except LazyfsError as exc:
        log.warning("%s: its startup profile is not kept longer under the cap: %s", digest[:19], exc)
        return []
    return [b.digest for b in prof.blocks] if prof else []


def _find(agent, lease_id: str) -> Shared | None:
    return next((s for s in agent.shared.values() if any(x.id == lease_id for x in s.leases)), None)


def op_release(agent, req, pid, conn, reader) -> dict:
    lease = _field(req, "lease")
    shared = _find(agent, lease)
    if shared is None:
        return {"unmounted": False, "known": False}  # dropped already (its holder was seen exiting)
    agent.leases.drop(shared, lease)
    return {"unmounted": shared.key not in agent.shared, "known": True}


def op_bind(agent, req, pid, conn, reader) -> dict:
    given = _field(req, "target")
    target = os.path.realpath(given)
    if not os.path.isdir(target):
        raise MountError(f"mountpoint {given} is not a directory")
    if mounts.mount_entry(target):
        raise MountError(f"{given} is already a mountpoint (lazyfs umount {given} first)")
    if os.listdir(target):
        raise MountError(f"mountpoint {given} is not empty (its files would be hidden)")
    got = op_acquire(agent, {**req, "kind": "mount", "target": target}, pid, conn, reader)
    try:
        kernel.mount_one(got["mountpoint"], target, "none", syscalls.MS_BIND, None)
    except BaseException:
        op_release(agent, {"lease": got["lease"]}, pid, conn, reader)
        raise
    return {**got, "target": target}


def op_unbind(agent, req, pid, conn, reader) -> dict:
    given = _field(req, "target")
    target = os.path.realpath(given)
    for shared in list(agent.shared.values()):
        for lease in shared.leases:
            if lease.kind == "mount" and lease.target == target:
                if not kernel.unmount_one(target, lazy=bool(req.get("lazy"))):
                    raise MountError(f"{given} is busy (a process is using it); stop it or use --lazy")
                agent.leases.drop(shared, lease.id)
                return {"unmounted": shared.key not in agent.shared}
    return {"known": False}


def op_exec(agent, req, pid, conn, reader) -> dict | None:
    """Start a `lazyfs run` as a fork of the fork server (lazyfs.node.forker, .zygote). Declining
    sends the client down the full CLI's slower path: that is logged and counted, never silent."""
    fds, reader.fds = reader.fds[:3], reader.fds[3:]
    try:
        if len(fds) != 3:
            raise NodeError(f"an exec request carries stdin, stdout and stderr, not {len(fds)} descriptor(s)")
        for name in ("argv", "env", "cwd"):
            _field(req, name, {"argv": list, "env": dict, "cwd": str}[name])
        if os.environ.get("LAZYFS_DAEMON_EXEC"):
            raise NodeError("LAZYFS_DAEMON_EXEC is set in the agent's environment (nothing is forked)")
        with agent.unlocked():  # a fork server restarting takes a moment; others go on
            worker = agent.forker.run(conn.fileno(), fds, {**req, "client_pid": pid})
    except NodeError as exc:
        agent.runs.fallbacks += 1
        agent.runs.last_fallback = str(exc)
        agent.runs.forker_starts = agent.forker.starts
        log.warning("a run from pid %d takes the slow path (the full CLI, not a fork): %s", pid, exc)
        return {"ok": False, "error": f"cannot fork a run now: {exc}", "kind": "NodeError"}
    finally:
        for fd in fds:
            os.close(fd)
    agent.runs.forked += 1
    agent.runs.forker_starts = agent.forker.starts
    log.debug("run from pid %d forked as pid %d", pid, worker)
    agent.forget_connection(conn, reader)  # the worker answers on it from now on
    return None


def op_snapshotter(agent, req, pid, conn, reader) -> dict:
    event = _field(req, "event")
    chain = str(req.get("chain", ""))[:80]
    if event == "lazy":
        agent.snapshots.lazy += 1
    elif event == "fallback":
        agent.snapshots.fallbacks += 1
        agent.snapshots.last_fallback = chain
        log.warning("containerd unpacks layer chain %s itself: the store has no lazyfs image of it", chain)
    else:
        raise NodeError(f"request 'snapshotter': event must be lazy or fallback, not {event[:40]!r}")
    return {}


def op_status(agent, req, pid, conn, reader) -> dict:
    images = []
    for s in list(agent.shared.values()):
        try:
            with agent.unlocked():
                counters = control.query(s.mountpoint, timeout=control.SCRAPE_TIMEOUT)
            agent.metrics.last_counters[s.key] = counters
        except MountError as exc:
            counters = {"error": str(exc)}
        images.append({"ref": s.ref, "digest": s.digest, "mountpoint": s.mountpoint, "layout": s.layout,
                       "daemon_pid": s.daemon_pid, "mounted_at": s.mounted_at, "idle_since": s.idle_since,
                       "users": [{"kind": x.kind, "pid": x.pid, "target": x.target, "since": x.since,
                                  "lease": x.id} for x in s.leases],
                       "cache_dir": s.options["cache_dir"], "counters": counters})
    return {"agent": {"pid": os.getpid(), "socket": str(agent.opts.socket), "idle": agent.opts.idle,
                      "cache_size": agent.opts.cache_size, "metrics": agent.metrics.address,
                      "forker_pid": agent.forker.pid, "runs": asdict(agent.runs),
                      "snapshots": asdict(agent.snapshots)},
            "images": images, "caches": [_cache_use(d, agent) for d in cache_dirs(agent)]}


def cache_dirs(agent) -> list[str]:
    return sorted({s.options["cache_dir"] for s in agent.shared.values()} | {str(paths.default_cache_dir())})


def _cache_use(root: str, agent) -> dict:
    from lazyfs.cache import cap
    files, size = cap.usage(root)
    hits, misses = agent.metrics.retired.get(root, (0, 0))  # of the mounts already gone
    for s in agent.shared.values():
        c = agent.metrics.last_counters.get(s.key, {}).get("cache", {})
        if s.options["cache_dir"] == root:
            hits, misses = hits + c.get("hits", 0), misses + c.get("misses", 0)
    return {"dir": root, "files": files, "bytes": size, "cap": agent.opts.cache_size,
            "hits": hits, "misses": misses,
            "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None}


def check(agent, shared: Shared) -> None:
    """Periodic: drop leases whose holder is gone, notice a dead shared mount."""
    for lease in list(shared.leases):
        gone = (lease.kind == "mount" and not mounts.mount_entry(lease.target)) or not lease.holder_alive()
        if gone:
            log.info("%s: user %s (%s) is gone; dropping its lease", shared.ref, lease.id, lease.kind)
            agent.leases.drop(shared, lease.id)
            if shared.key not in agent.shared:
                return
    if mounts.is_stale(shared.mountpoint):
        log.error("%s: the mount daemon of %s died; unmounting the dead mount", shared.ref, shared.mountpoint)
        mounts.clean_stale(shared.mountpoint)
        agent.shared.pop(shared.key, None)
        table.forget(shared)


def over_cap(agent, roots: list[str]) -> bool:
    from lazyfs.cache import cap
    return any(cap.usage(root)[1] > agent.opts.cache_size for root in roots
               if cachelayout.ledger_path(root).exists())


def enforce_cap(agent, roots: list[str]) -> None:
    """On a pool thread, without the agent's lock: trim every node cache the agent's mounts use
    that its ledger says is over the cap (the daemons reserve room as they write; this catches
    what was written around them). Skipped for a cache another process is trimming already."""
    from lazyfs.cache import cap
    try:
        with agent.lock:
            keep = cap.keep_longer(list(agent.shared.values()))
        for root in roots:
            if cap.usage(root)[1] > agent.opts.cache_size:
                try:
                    cap.trim(root, agent.opts.cache_size, keep, wait=False)
                except BlockingIOError:
                    pass
    finally:
        agent.later(lambda: setattr(agent, "trimming", False))


def watch_ledgers(agent, roots: list[str]) -> None:
    """Every tick: note the least each cache had in flight since the last reconcile."""
    from lazyfs.cache import cap
    for root in roots:
        if cachelayout.ledger_path(root).exists():  # (made by the first write, with a walk)
            _, _, fb, ff = cap.ledger(root).record()
            low = agent.flight_low.get(root, (fb, ff))
            agent.flight_low[root] = (min(low[0], fb), min(low[1], ff))


def reconcile(agent, roots: list[str]) -> None:
    """On a pool thread, without the agent's lock: correct each cache ledger's drift, dropping
    the reservations that stayed in flight over the whole interval (dead writers')."""
    from lazyfs.cache import cap
    with agent.lock:
        stale = {root: agent.flight_low.pop(root, (0, 0)) for root in roots}
    for root in roots:
        if os.path.isdir(root) and not cap.ledger(root).reconcile(stale[root]):
            log.info("cache %s: written to during the walk; its ledger is checked again later", root)

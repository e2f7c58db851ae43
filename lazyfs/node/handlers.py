"""What the agent answers: one function per request (``op_NAME``), plus its periodic checks.

Requests: ``hello``, ``acquire`` (a lease on an image's shared mount, mounting it for the first
user), ``release``, ``bind``/``unbind`` (`lazyfs mount`/`umount` through the agent), ``status``,
``handoff`` (an upgrade: leave everything mounted and exit), ``exec`` (lazyfs.node.zygote).
"""
from __future__ import annotations

import argparse
import logging
import os
import time

from lazyfs import paths
from lazyfs.errors import MountError, NodeError
from lazyfs.fs import control, kernel, mounts
from lazyfs.node import table
from lazyfs.node.table import Lease, Shared
from lazyfs.remote.source import Source
from lazyfs.store import objects

log = logging.getLogger("lazyfs.node")
MS_BIND = 4096


def op_hello(agent, req, pid, conn, reader) -> dict:
    return {"pid": os.getpid(), "socket": str(agent.opts.socket)}


def op_handoff(agent, req, pid, conn, reader) -> dict:
    log.info("handing over to a new agent (pid %d); leaving %d mount(s) up", pid, len(agent.shared))
    agent.handoff = agent.stopping = True
    return {}


def _source(args: list) -> Source:
    p = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    Source.add_arguments(p)
    try:
        return Source.from_namespace(p.parse_args([str(a) for a in args]))
    except (argparse.ArgumentError, SystemExit) as exc:
        raise NodeError(f"bad source in request: {exc}") from None


def _resolve(agent, source: Source, ref: str) -> tuple[str, dict]:
    """The manifest digest and config of ``ref``, from the agent's open store or fleet."""
    key = tuple(source.args())
    reader = agent.readers.get(key)
    if reader is None:
        reader = agent.readers[key] = source.open()
    try:
        digest = objects.resolve(reader, ref)
        if digest not in agent.configs:
            agent.configs[digest] = objects.read_config(reader, digest)
        return digest, agent.configs[digest]
    except BaseException:
        agent.readers.pop(key, None)  # a fresh connection next time
        reader.close()
        raise


def op_acquire(agent, req, pid, conn, reader) -> dict:
    source = _source(req.get("source") or [])
    digest, config = _resolve(agent, source, str(req["ref"]))
    options = {"source": source.args(),
               "cache_dir": os.path.abspath(req.get("cache_dir") or paths.default_cache_dir()),
               "data_path": req.get("data_path") or "auto", "profile": req.get("profile") or "auto",
               "complete": bool(req.get("complete")), "cache_size": agent.opts.cache_size}
    shared, mounted = _shared(agent, digest, str(req["ref"]), options, source, config)
    kind = req.get("kind") or "run"
    lease = Lease.new(kind, pid if kind == "run" else 0, req.get("target") or "")
    agent.add_lease(shared, lease)
    return {"lease": lease.id, "digest": digest, "mountpoint": shared.mountpoint, "config": config,
            "layout": shared.layout, "daemon_pid": shared.daemon_pid, "mounted": mounted}


def _shared(agent, digest: str, ref: str, options: dict, source: Source,
            config: dict) -> tuple[Shared, bool]:
    """The live shared mount for these options, and whether this request had to mount it."""
    k = table.key(digest, options)
    shared = agent.shared.get(k)
    if shared is not None and not mounts.is_stale(shared.mountpoint) and mounts.mount_entry(shared.mountpoint):
        agent.metrics.reuses.inc()
        return shared, False
    if shared is not None:  # its daemon died: the users it had get errors; new users get a new mount
        log.warning("%s: shared mount %s died; mounting it again", ref, shared.mountpoint)
        mounts.clean_stale(shared.mountpoint)
        agent.shared.pop(k, None)
    mnt = table.mounts_dir() / k
    mnt.mkdir(parents=True, exist_ok=True)
    logs = paths.node_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    state = mounts.mount(digest, str(mnt), source, options["cache_dir"], str(logs / f"{k}.log"),
                         checked=True, profile=options["profile"], data_path=options["data_path"],
                         complete=options["complete"], cache_size=options["cache_size"])
    agent.metrics.mounts.inc()
    agent.metrics.mount_seconds.observe(time.monotonic() - t0)
    shared = Shared(k, digest, ref, options, str(mnt), state.pid, state.layout, config,
                    mounted_at=time.time(), profile_blocks=_profile_blocks(agent, source, digest, options))
    agent.shared[k] = shared
    log.info("%s (%s): mounted on %s in %.3f s (%s data path)", ref, digest[:19], mnt,
             time.monotonic() - t0, state.layout)
    return shared, True


def _profile_blocks(agent, source: Source, digest: str, options: dict) -> list[str]:
    if not agent.opts.cache_size or options["profile"] == "none":
        return []
    from lazyfs import profiles
    prof = profiles.load(agent.readers[tuple(source.args())], digest, options["profile"])
    return [b.digest for b in prof.blocks] if prof else []


def _find(agent, lease_id: str) -> Shared | None:
    return next((s for s in agent.shared.values() if any(x.id == lease_id for x in s.leases)), None)


def op_release(agent, req, pid, conn, reader) -> dict:
    shared = _find(agent, str(req.get("lease")))
    if shared is None:
        return {"unmounted": False, "known": False}  # dropped already (its holder was seen exiting)
    agent.drop_lease(shared, str(req["lease"]))
    return {"unmounted": shared.key not in agent.shared, "known": True}


def op_bind(agent, req, pid, conn, reader) -> dict:
    target = os.path.realpath(str(req["target"]))
    if not os.path.isdir(target):
        raise MountError(f"mountpoint {req['target']} is not a directory")
    if mounts.mount_entry(target):
        raise MountError(f"{req['target']} is already a mountpoint (lazyfs umount {req['target']} first)")
    if os.listdir(target):
        raise MountError(f"mountpoint {req['target']} is not empty (its files would be hidden)")
    got = op_acquire(agent, {**req, "kind": "mount", "target": target}, pid, conn, reader)
    try:
        kernel.mount_one(got["mountpoint"], target, "none", MS_BIND, None)
    except BaseException:
        op_release(agent, {"lease": got["lease"]}, pid, conn, reader)
        raise
    return {**got, "target": target}


def op_unbind(agent, req, pid, conn, reader) -> dict:
    target = os.path.realpath(str(req["target"]))
    for shared in list(agent.shared.values()):
        for lease in shared.leases:
            if lease.kind == "mount" and lease.target == target:
                if not kernel.unmount_one(target, lazy=bool(req.get("lazy"))):
                    raise MountError(f"{req['target']} is busy (a process is using it); stop it or use --lazy")
                agent.drop_lease(shared, lease.id)
                return {"unmounted": shared.key not in agent.shared}
    return {"known": False}


def op_exec(agent, req, pid, conn, reader) -> dict | None:
    """Start a `lazyfs run` from a fork of the agent (lazyfs.node.zygote)."""
    from lazyfs.fs import spawn
    from lazyfs.node import zygote
    fds, reader.fds = reader.fds[:3], reader.fds[3:]
    if len(fds) != 3 or not spawn.single_threaded():
        for fd in fds:
            os.close(fd)
        return {"ok": False, "error": "cannot fork a run now", "kind": "NodeError"}
    worker = zygote.start(conn, fds, req)
    for fd in fds:
        os.close(fd)
    from lazyfs.node import wire
    wire.send(conn, {"ok": True, "pid": worker})
    agent.forget_connection(conn, reader)  # the worker answers on it from now on
    return None


def op_status(agent, req, pid, conn, reader) -> dict:
    images = []
    for s in agent.shared.values():
        try:
            counters = agent.metrics.last_counters[s.key] = control.query(s.mountpoint, timeout=2.0)
        except MountError as exc:
            counters = {"error": str(exc)}
        images.append({"ref": s.ref, "digest": s.digest, "mountpoint": s.mountpoint, "layout": s.layout,
                       "daemon_pid": s.daemon_pid, "mounted_at": s.mounted_at, "idle_since": s.idle_since,
                       "users": [{"kind": x.kind, "pid": x.pid, "target": x.target, "since": x.since}
                                 for x in s.leases],
                       "cache_dir": s.options["cache_dir"], "counters": counters})
    return {"agent": {"pid": os.getpid(), "socket": str(agent.opts.socket), "idle": agent.opts.idle,
                      "cache_size": agent.opts.cache_size, "metrics": agent.metrics.address},
            "images": images, "caches": [_cache_use(d, agent) for d in _cache_dirs(agent)]}


def _cache_dirs(agent) -> list[str]:
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
            agent.drop_lease(shared, lease.id)
            if shared.key not in agent.shared:
                return
    if mounts.is_stale(shared.mountpoint):
        log.error("%s: the mount daemon of %s died; unmounting the dead mount", shared.ref, shared.mountpoint)
        mounts.clean_stale(shared.mountpoint)
        agent.shared.pop(shared.key, None)
        table.forget(shared)


def enforce_cap(agent) -> None:
    """Trim every node cache the agent's mounts use to the cap (the daemons trim as they write
    too; this catches what several of them wrote together)."""
    from lazyfs.cache import cap
    for root in _cache_dirs(agent):
        if cap.usage(root)[1] > agent.opts.cache_size:
            cap.trim(root, agent.opts.cache_size, cap.keep_longer(agent.shared.values()))

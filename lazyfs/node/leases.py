"""Who uses each of the agent's shared mounts, and when an unused one goes.

Every user of a shared mount holds a lease on it (lazyfs.node.table.Lease): a run, a bound
mountpoint, a snapshot in progress. A run's lease lasts as long as its process: the loop watches
the holder through a pidfd, so a run killed with SIGKILL, which never says goodbye, still hands its
mount back the moment it exits, and the agent sweeps what such a run left (Agent.sweep_soon: its
overlay, a podman container under conmon). A mount whose last lease is dropped stays for ``idle``
seconds (the next run of the image finds it mounted), then is unmounted; one still busy, or with
a killed run's overlay still on it (a container may outlive its run), is tried again later. All
of it runs with the agent's lock held; what touches the selector runs on the loop's thread
(Agent.later).
"""
from __future__ import annotations

import logging
import os
import selectors
import time

from lazyfs.errors import MountError
from lazyfs.fs import mounts
from lazyfs.node import table
from lazyfs.node.table import Lease, Shared

log = logging.getLogger("lazyfs.node")
BUSY_RETRY = 1.0  # an idle mount that is still busy (a container outlived its run) is tried again
STACKED_RETRY = 5.0  # one that a killed run's overlay still sits on, until a sweep removes that


class Leases:
    def __init__(self, agent):
        self.agent = agent
        self.pidfds: dict[int, tuple[str, str]] = {}  # pidfd → (shared key, lease id)
        self._told: set[str] = set()  # shared keys whose idle mount was said to be still in use

    def add(self, shared: Shared, lease: Lease) -> None:
        shared.leases.append(lease)
        shared.idle_since = None
        table.save(shared)
        if lease.kind == "run":
            self.agent.later(lambda: self._watch(shared, lease))

    def drop(self, shared: Shared, lease_id: str) -> None:
        shared.leases = [x for x in shared.leases if x.id != lease_id]
        self.agent.later(lambda: self._unwatch_lease(lease_id))
        if not shared.leases:
            shared.idle_since = time.time()
            if self.agent.opts.idle <= 0:
                self.unmount(shared)
                return
        table.save(shared)

    def _watch(self, shared: Shared, lease: Lease) -> None:
        if shared.key not in self.agent.shared or lease not in shared.leases:
            return  # released before the loop got to it
        try:
            fd = os.pidfd_open(lease.pid)
        except ProcessLookupError:
            self.drop(shared, lease.id)
            return
        self.pidfds[fd] = (shared.key, lease.id)
        self.agent.sel.register(fd, selectors.EVENT_READ, self._holder_exited)

    def _unwatch_lease(self, lease_id: str) -> None:
        for fd, (_, lid) in list(self.pidfds.items()):
            if lid == lease_id:
                self._unwatch(fd)

    def _unwatch(self, fd: int) -> None:
        if self.pidfds.pop(fd, None) is None:
            return  # unwatched already (its holder exited and the lease was dropped)
        try:
            self.agent.sel.unregister(fd)
        except (KeyError, ValueError):
            pass
        os.close(fd)

    def _holder_exited(self, fd: int) -> None:
        key, lease_id = self.pidfds.get(fd, (None, None))
        self._unwatch(fd)
        shared = self.agent.shared.get(key)
        if shared is not None and any(x.id == lease_id for x in shared.leases):
            log.info("%s: a user exited without handing its lease back; dropping it", shared.ref)
            self.drop(shared, lease_id)
            self.agent.sweep_soon()  # what it left (its overlay, a container under conmon)

    def unmount(self, shared: Shared) -> bool:
        """Unmount an unused shared mount; False (and tried again later) while it is busy."""
        agent = self.agent
        t0 = time.monotonic()
        stacked = mounts.stacked_on(shared.mountpoint)
        if stacked:  # (a killed run's overlay, still there: its container may still read)
            return self._still_used(shared, f"an overlay on it ({stacked[0]})", STACKED_RETRY)
        agent.metrics.snapshot(shared)
        try:
            if mounts.mount_entry(shared.mountpoint) or mounts.is_stale(shared.mountpoint):
                mounts.umount(shared.mountpoint, timeout=5.0)
        except MountError as exc:
            if "busy" in str(exc):
                return self._still_used(shared, "busy", BUSY_RETRY)
            log.warning("%s: %s", shared.ref, exc)
        self._told.discard(shared.key)
        agent.shared.pop(shared.key, None)
        agent.metrics.retire(shared)
        table.forget(shared)
        try:
            os.rmdir(shared.mountpoint)
        except OSError:
            pass
        agent.metrics.unmounts.inc()
        agent.metrics.unmount_seconds.observe(time.monotonic() - t0)
        log.info("%s: unmounted after %.0f s idle (%.3f s)", shared.ref,
                 time.time() - (shared.idle_since or time.time()), time.monotonic() - t0)
        return True

    def _still_used(self, shared: Shared, why: str, retry: float) -> bool:
        if shared.key not in self._told:  # (once, not at every try)
            self._told.add(shared.key)
            log.warning("%s: idle but still used: %s (a container outlived its run?); trying again "
                        "every %.0f s", shared.ref, why, retry)
        shared.idle_since = time.time() - self.agent.opts.idle + retry
        return False

    def unmount_idle(self) -> None:
        """Unmount the shared mounts that have been unused for the agent's idle time."""
        now = time.time()
        for shared in list(self.agent.shared.values()):
            if self._idle_until(shared) <= now:
                self.unmount(shared)

    def next_idle(self) -> float:
        """When (time.monotonic) the next unused mount's idle time runs out; inf if none."""
        due = [self._idle_until(s) for s in self.agent.shared.values()]
        if not due or min(due) == float("inf"):
            return float("inf")
        return time.monotonic() + max(0.0, min(due) - time.time())

    def _idle_until(self, shared: Shared) -> float:
        if shared.leases or shared.idle_since is None:
            return float("inf")
        return shared.idle_since + self.agent.opts.idle

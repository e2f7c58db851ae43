"""`lazyfs node`: the resident agent. One selector loop, and a few threads that answer requests.

It keeps the shared mounts (lazyfs.node.table), the open stores and fleets and the image configs
they gave, and the node cache's cap. It is never in the data path: each shared mount is served by
its own mount daemon (lazyfs.fs.daemon), a separate process that holds the FUSE connection and
outlives the agent. So a SIGKILL or an upgrade of the agent cannot break a container's reads; the
next agent adopts the mounts from their state files (table.load_all) and goes on counting users.

The loop (main thread) accepts connections, reads requests, watches run holders (lazyfs.node.leases)
and ticks; each request is answered on a thread of ``self.pool``, so a cold mount that waits on a
slow server does not hold up a warm run of another image. Every change to the agent's state happens
with ``self.lock`` held; a handler lets go of it only around slow work (fetching a manifest,
mounting: ``unlocked()``), and a mount in progress is marked so a second user of the same image
waits for it rather than mounting it twice. The agent never forks: mount daemons and forked runs
come from its fork server (lazyfs.node.forker), started while the agent still had one thread.
"""
from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lazyfs import paths
from lazyfs.cache.ledger import RECONCILE_EVERY
from lazyfs.errors import LazyfsError, NodeError
from lazyfs.fs import mounts
from lazyfs.node import listen, table, wire
from lazyfs.node.flight import Flights
from lazyfs.node.forker import ForkServer
from lazyfs.node.metrics import Metrics, RunCounts, SnapshotCounts
from lazyfs.node.recent import RecentManifests
from lazyfs.node.leases import Leases
from lazyfs.proc.syscalls import peer_credentials
from lazyfs.node.table import Shared

log = logging.getLogger("lazyfs.node")
TICK = 0.5  # seconds between checks of leases, dead mounts and the cache cap
# Requests answered at once (mounts, runs, status); more wait in the pool's queue. A request
# waiting on another's work (one image's mount, its tag lookup) holds a thread, so there are
# threads for every pod a node runs (Kubernetes' max-pods is 110 by default); the pool starts
# them only as requests need them, and one that waits costs a stack, not a place in the queue.
WORKERS = 256
# Answered on the loop's thread, never queued behind slow requests: each takes the lock briefly.
INLINE_OPS = frozenset({"hello", "release", "unbind", "handoff", "snapshotter"})
SHUTDOWN_WAIT = 5.0  # seconds a stopping agent lets requests in progress finish
SWEEP_RETRY, SWEEP_TRIES = 1.0, 10  # what a sweep had to leave in use, tried again (seconds, times)


@dataclass
class AgentOptions:
    socket: Path
    idle: float  # seconds an unused shared mount stays
    cache_size: int | None  # bytes; None: no cap
    metrics: str | None  # HOST:PORT for /metrics, or None
    takeover: bool = False
    on_demand: bool = False  # started by a client (`lazyfs run`), not by the node's own supervisor
    # Removes what runs killed without tearing down left on the node (their overlays, containers
    # under conmon, snapshot workspaces), and says how many it had to leave in use; composed by
    # the CLI, which knows the runner and snapshots (this layer does not).
    sweep: Callable[[], int] | None = None


class Agent:
    def __init__(self, opts: AgentOptions):
        self.opts = opts
        self.sel = selectors.DefaultSelector()
        self.shared: dict[str, Shared] = {}
        self.readers: dict[tuple, object] = {}  # source args → open BlockSource (the fetchers)
        self.configs: dict[str, dict] = {}  # manifest digest → image config
        self.manifests = RecentManifests()  # verified manifest bytes, handed to the mounts' daemons
        self.leases = Leases(self)  # who uses each shared mount; unmounting the unused
        self.stopping = False
        self.handoff = False
        self.metrics = Metrics(self)
        self.listener: socket.socket | None = None
        self.next_tick = 0.0
        self.next_reconcile = time.monotonic() + RECONCILE_EVERY
        self.flight_low: dict[str, tuple[int, int]] = {}  # cache dir → least (bytes, files) seen in
        # flight since the last reconcile: what stayed in flight all along is a dead writer's
        self.trimming = False
        self.lock = threading.RLock()
        self.mounting: dict[str, threading.Event] = {}  # shared key → set when its mount is done
        self.resolving = Flights(self.unlocked)  # (source, ref) → its digest and config, once
        self.runs = RunCounts()
        self.snapshots = SnapshotCounts()
        self.forker = ForkServer(str(paths.node_dir() / "agent.log"))
        self.pool: ThreadPoolExecutor | None = None
        self._later: deque = deque()
        self._sweep_lock = threading.Lock()
        self._sweep_wanted = self._sweeping = False
        self._wake: socket.socket | None = None
        from lazyfs.node import handlers  # the request handlers, one module
        self.handlers = handlers

    # -- life cycle -----------------------------------------------------------------------------
    def run(self, ready=lambda msg: None) -> int:
        self.listener = listen.claim(self.opts.socket, self.opts.takeover, self.opts.on_demand)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.sel.register(wake_r, selectors.EVENT_READ, lambda s: s.recv(4096))
        self._wake = wake_w
        self._adopt()
        from lazyfs.node import zygote
        zygote.preload()
        self.forker.start()  # now, while this process has one thread: forks of it are safe
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="agent")
        self.sweep_soon()  # (runs killed while no agent was up; a thread: after the fork server)
        self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        self.metrics.start()
        ready(f"ready on {self.opts.socket} (pid {os.getpid()}; {len(self.shared)} mount(s) adopted)")
        listen.sd_notify("READY=1")
        try:
            while not self.stopping:
                timeout = max(0.0, min(self.next_tick, self.leases.next_idle()) - time.monotonic())
                events = self.sel.select(timeout)
                with self.lock:
                    for key, _ in events:
                        try:
                            key.data(key.fileobj)
                        except Exception:  # one client's trouble is not the node's
                            log.exception("serving %r failed", key.fileobj)
                    while self._later:
                        try:
                            self._later.popleft()()
                        except Exception:  # one watch or connection's trouble is not the node's
                            log.exception("a deferred step failed")
                    try:
                        self._tick()
                    except Exception:  # a check that failed is tried again next tick
                        log.exception("periodic check failed")
                        self.next_tick = time.monotonic() + TICK
        finally:
            signal.set_wakeup_fd(-1)
            with self.lock:
                self._shutdown()
        return 0

    def sweep_soon(self) -> None:
        """Sweep what killed runs left, on a thread of its own (a podman container takes seconds
        to stop); one sweep at a time, and one more if asked for meanwhile. What is still in use
        (a container still exiting) is tried again, SWEEP_TRIES times."""
        if self.opts.sweep is None:
            return
        with self._sweep_lock:
            self._sweep_wanted = True
            if self._sweeping:
                return
            self._sweeping = True
        threading.Thread(target=self._sweep_all, name="sweep", daemon=True).start()

    def _sweep_all(self) -> None:
        tries = 0
        while True:
            with self._sweep_lock:
                if not self._sweep_wanted:
                    self._sweeping = False
                    return
                self._sweep_wanted = False
            try:
                left = self.opts.sweep()
            except Exception:  # a leftover must not take the agent down
                log.exception("sweeping what killed runs left failed")
                left = 0
            tries = tries + 1 if left else 0
            if left and tries < SWEEP_TRIES:
                time.sleep(SWEEP_RETRY)
                with self._sweep_lock:
                    self._sweep_wanted = True

    def later(self, fn) -> None:
        """Run ``fn`` on the loop's thread (which owns the selector), soon."""
        self._later.append(fn)
        try:
            self._wake.send(b"\0")
        except BlockingIOError:  # the loop has wake-ups pending already
            pass

    @contextmanager
    def unlocked(self):
        """Let other requests and the loop go on while this handler waits on slow work."""
        self.lock.release()
        try:
            yield
        finally:
            self.lock.acquire()

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True

    def _shutdown(self) -> None:
        """SIGTERM: unmount what nobody uses; leave what containers use for the next agent."""
        if self.listener is not None:
            self.listener.close()
            if listen.live_agent(self.opts.socket) is None:
                self.opts.socket.unlink(missing_ok=True)
        self.metrics.stop()
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._let_requests_finish()
        self.forker.close()
        if not self.handoff:
            for shared in list(self.shared.values()):
                if not shared.leases:
                    self.leases.unmount(shared)
        for reader in self.readers.values():
            try:
                reader.close()
            except Exception:  # a store that fails to close must not keep the agent up
                pass
        log.info("node agent %d stopped; %d mount(s) left for the next agent", os.getpid(), len(self.shared))

    def _let_requests_finish(self) -> None:
        """Requests in progress (a cold mount) get SHUTDOWN_WAIT seconds; the process then exits
        without waiting for any still running (lazyfs node exits with os._exit), so a takeover
        is never held up by a mount stuck on a slow server."""
        deadline = time.monotonic() + SHUTDOWN_WAIT
        for t in list(getattr(self.pool, "_threads", ())):
            with self.unlocked():
                t.join(max(0.0, deadline - time.monotonic()))

    # -- connections ----------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        pid, uid, _ = peer_credentials(conn)
        if uid != 0:
            wire.send(conn, {"ok": False, "error": "the node agent serves root only", "kind": "NodeError"})
            conn.close()
            return
        conn.settimeout(10.0)  # a client that stops reading must not stall the agent for long
        reader = wire.LineReader(conn)
        self.sel.register(conn, selectors.EVENT_READ, lambda c: self._readable(c, reader, pid))

    def _readable(self, conn: socket.socket, reader: wire.LineReader, pid: int) -> None:
        try:
            alive = reader.feed()
        except NodeError as exc:  # a line past wire.MAX_LINE: say so, and hang up
            try:
                wire.send(conn, {"ok": False, "error": f"malformed request: {exc}", "kind": "NodeError"})
            except OSError:
                pass
            self._close(conn, reader)
            return
        except OSError as exc:
            log.debug("client %d: %s", pid, exc)
            alive = False
        line = reader.line()
        if line is None:
            if not alive:
                self._close(conn, reader)
            return
        if _op(line) in INLINE_OPS:  # quick, and must not wait behind mounts: answered here
            try:
                kept = self._answer(conn, line, reader, pid)
            except OSError as exc:
                log.debug("client %d: %s", pid, exc)
                kept = False
            if not kept:
                self._close(conn, reader)
            return
        # One request at a time per connection: its later lines wait until this one is answered.
        self.sel.unregister(conn)
        self.pool.submit(self._serve, conn, reader, pid, line)

    def _serve(self, conn: socket.socket, reader: wire.LineReader, pid: int, line: bytes) -> None:
        """On a pool thread: answer one request, then hand the connection back to the loop."""
        kept = False
        try:
            with self.lock:
                kept = self._answer(conn, line, reader, pid)
        except OSError as exc:  # the client went away before its answer
            log.debug("client %d: %s", pid, exc)
        except Exception:
            log.exception("request from pid %d failed", pid)
        self.later(lambda: self._resume(conn, reader, pid) if kept else self._close(conn, reader))

    def _resume(self, conn: socket.socket, reader: wire.LineReader, pid: int) -> None:
        if conn.fileno() < 0:
            return
        self.sel.register(conn, selectors.EVENT_READ, lambda c: self._readable(c, reader, pid))
        if b"\n" in reader.buf:  # a request that arrived with the last one
            self.sel.unregister(conn)
            self.pool.submit(self._serve, conn, reader, pid, reader.line())

    def forget_connection(self, conn: socket.socket, reader: wire.LineReader) -> None:
        """Stop serving a connection another process now answers on (our copy is closed)."""
        self._close(conn, reader)

    def _close(self, conn: socket.socket, reader: wire.LineReader) -> None:
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        for fd in reader.fds:
            os.close(fd)
        reader.fds.clear()
        conn.close()

    def _answer(self, conn: socket.socket, line: bytes, reader: wire.LineReader, pid: int) -> bool:
        """Answer one request line; False when the connection is no longer ours to serve."""
        try:
            req = wire.decode(line)
        except NodeError as exc:
            self.metrics.requests.labels(op="malformed").inc()
            wire.send(conn, {"ok": False, "error": f"malformed request: {exc}", "kind": "NodeError"})
            return True
        op = req.get("op")
        fn = getattr(self.handlers, f"op_{op}", None) if isinstance(op, str) else None
        self.metrics.requests.labels(op=str(op) if fn else "unknown").inc()
        if fn is None:
            wire.send(conn, {"ok": False, "error": f"unknown request {str(op)[:100]!r}", "kind": "NodeError"})
            return True
        try:
            answer = fn(self, req, pid, conn, reader)
        except LazyfsError as exc:
            answer = {"ok": False, "error": str(exc), "kind": type(exc).__name__}
        except OSError as exc:
            answer = {"ok": False, "error": str(exc), "kind": "OSError"}
        except Exception as exc:  # a bug or a malformed request must not take the node's agent down
            log.exception("request %r from pid %d failed", op, pid)
            answer = {"ok": False, "error": f"the node agent failed on {op!r}: {exc!r}", "kind": "NodeError"}
        if answer is None:  # the handler handed the connection on (a forked run answers on it)
            return False
        wire.send(conn, {"ok": True, **answer} if "ok" not in answer else answer)
        return True

    # -- periodic checks and adoption -------------------------------------------------------
    def _tick(self) -> None:
        self.leases.unmount_idle()
        if time.monotonic() < self.next_tick:
            return
        self.next_tick = time.monotonic() + TICK
        self.forker.reap()
        for shared in list(self.shared.values()):
            self.handlers.check(self, shared)
        roots = self.handlers.cache_dirs(self)
        self.handlers.watch_ledgers(self, roots)
        if self.opts.cache_size and not self.trimming and self.handlers.over_cap(self, roots):
            self.trimming = True  # walks: on a pool thread, without the lock, one at a time
            self.pool.submit(self.handlers.enforce_cap, self, roots)
        if time.monotonic() >= self.next_reconcile:
            self.next_reconcile = time.monotonic() + RECONCILE_EVERY
            self.pool.submit(self.handlers.reconcile, self, roots)

    def _adopt(self) -> None:
        """Take over the mounts a previous agent left: live ones with their live users; dead
        ones (their daemon died too) are cleaned away."""
        for shared in table.load_all():
            if not os.path.isdir(shared.mountpoint) or mounts.is_stale(shared.mountpoint) or \
                    not mounts.mount_entry(shared.mountpoint):
                log.warning("%s: its mount died with the previous agent's run; cleaning it", shared.ref)
                mounts.clean_stale(shared.mountpoint)
                table.forget(shared)
                shutil.rmtree(shared.mountpoint, ignore_errors=True)
                continue
            live = [x for x in shared.leases if x.holder_alive()]
            shared.leases = []
            self.shared[shared.key] = shared
            for lease in live:
                self.leases.add(shared, lease)
            if not live:
                shared.idle_since = shared.idle_since or time.time()
                table.save(shared)
            log.info("adopted %s (%s) with %d user(s)", shared.ref, shared.mountpoint, len(live))


def _op(line: bytes) -> str | None:
    """The request's op, if the line is a JSON object that has one (else the pool answers it)."""
    try:
        op = wire.decode(line).get("op")
    except NodeError:
        return None
    return op if isinstance(op, str) else None

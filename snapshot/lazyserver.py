"""The lazy-pages process of `lazyfs run --restore`: receives the userfaultfds from
`criu restore --lazy-pages` and serves the snapshot's memory from verified blocks until every
page is in (lazypages.Handler), then writes a status file (errors, counters, working set).

It runs apart from `lazyfs run` (forked, or as `python -m snapshot.lazyserver`) so that the
restored process keeps its memory source whatever happens to the command that started it; it
never exits with pages missing unless it has killed the restored tree first.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lazyfs.records import profiles
from lazyfs.format import snapshot as snapfmt
from lazyfs.source.spec import Source
from lazyfs.records import objects
from lazyfs.proc import spawn, syscalls
from snapshot import procs
from snapshot.criuimg import parse_pagemap
from snapshot.files import BlockFetcher, is_pages
from snapshot.lazypages import Blocks, Handler

log = logging.getLogger("lazyfs.snapshot.lazy")
RESTORE_FINISHED = 0x52535446  # criu/uffd.c LAZY_PAGES_RESTORE_FINISHED
NAME = "lazyfs-pages"  # its process name (ps -o comm, top)
SOCKET_NAME = "lazy-pages.socket"  # where criu restore connects, in its work (images) dir


@dataclass(frozen=True)
class Config:
    images: str  # the local CRIU images directory (pagemaps already there)
    snapshot: str  # snapshot manifest digest
    source: Source
    cache_dir: str | None
    pidfile: str  # criu writes the restored root's pid here
    status: str  # JSON written at the end: error (or null), counters
    working_set: bool = True  # prefetch the recorded working set, if there is one
    record: bool = True  # report the working set (status file) if none was recorded yet

    def args(self) -> list[str]:
        out = ["--images", self.images, "--snapshot", self.snapshot, "--pidfile", self.pidfile,
               "--status", self.status, *self.source.args()]
        if self.cache_dir:
            out += ["--cache-dir", self.cache_dir]
        return out + ([] if self.working_set else ["--no-working-set"]) + (
            [] if self.record else ["--no-record"])


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            raise EOFError
        data += part
    return data


def _link(listener: socket.socket, handler: Handler, stop: threading.Event, peer: list) -> None:
    """criu restore's side: (pid, uffd) per task, then RESTORE_FINISHED. ``peer`` gets a pidfd
    of criu (the kernel's word for who connected), for a restore that must be stopped."""
    try:
        conn, _ = listener.accept()
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        try:  # a pidfd: the pid alone could name another process by the time it is used
            peer.append(os.pidfd_open(struct.unpack("3i", cred)[0]))
        except OSError:
            pass  # gone already
        with conn:
            while True:
                (word,) = struct.unpack("<i", _recv_exact(conn, 4))
                if word == RESTORE_FINISHED:
                    handler.restore_finished()
                    return
                if word < 0:  # a zombie: nothing to serve
                    continue
                _, fds, _, _ = socket.recv_fds(conn, 1, 1)
                if len(fds) != 1:
                    raise EOFError
                handler.add_task(word, fds[0])
    except (EOFError, OSError) as exc:
        log.info("criu restore hung up before it finished (%s)", exc or "EOF")
        stop.set()
    except BaseException as exc:  # noqa: BLE001 - a task we cannot serve must not run
        handler.fatal(f"cannot serve the restored task: {exc}")
    finally:
        handler.poke()


class Killer:
    """SIGKILL for the restored tree (its root is its PID namespace's init, so the whole tree
    goes). Before criu restore has written the root's pid, it waits for it: the server must not
    let go of the userfaultfds of a tree that is about to run (``wait`` before closing)."""

    def __init__(self, pidfile: str, stop: threading.Event):
        self.pidfile, self.stop = Path(pidfile), stop
        self.thread: threading.Thread | None = None

    def __call__(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._kill, name="killer", daemon=True)
            self.thread.start()
            self.thread.join(0.5)

    def _kill(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                pid = int(self.pidfile.read_text())
            except (OSError, ValueError):
                if self.stop.is_set():  # lazyfs run is done with criu: it restored nothing
                    return
                time.sleep(0.01)
                continue
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                return
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                # Until the root is gone: it is its PID namespace's init, so by then every other
                # task of the tree is gone too, and none can run on the zero pages the kernel
                # hands out once the descriptors close.
                spawn.readable(fd, 30.0)
            except ProcessLookupError:
                pass
            finally:
                os.close(fd)
            return

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()


def run(cfg: Config, ready_fd: int | None = None, known: tuple | None = None) -> int:
    """Serve until the restored tree is done. ``known``: (snapshot, working-set profile or
    None) as `lazyfs run` read them already (a forked server need not fetch them again)."""
    stop = threading.Event()
    parent = os.getppid()  # lazyfs run
    # lazyfs run says it is done with the tree by SIGUSR1 (PageServer.finish). A SIGTERM is
    # anyone's (`pkill -f "lazyfs run"` matches this process's command line too): the tree may
    # still run, and is killed, with criu, before a descriptor is let go.
    terminated = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: (terminated.set(), stop.set()))
    status: dict = {"error": None}
    handler = killer = fetcher = None
    peer: list[int] = []  # criu restore, once it connects (pidfds)
    try:
        reader = cfg.source.open()
        if known is not None:
            snap, profile = known
        else:
            snap = snapfmt.decode(objects.read_manifest_bytes(reader, cfg.snapshot))
            profile = profiles.load(reader, cfg.snapshot) if cfg.working_set else None
        blocks = Blocks()
        for f in snap.files:
            if is_pages(f.name):
                blocks.add_file(f.name.rpartition("/")[2], f.chunks)
        touched = sorted(profile.blocks, key=lambda b: b.t) if profile else []
        # One key per digest: a delivery serves every key with that digest.
        plan = [blocks.by_digest[b.digest][0] for b in touched if b.digest in blocks.by_digest]
        status["working_set_blocks"] = len(plan)
        images = Path(cfg.images)
        killer = Killer(cfg.pidfile, stop)
        fetcher = BlockFetcher(cfg.source, cfg.cache_dir, reader)
        # The memory's blocks go into the node cache (for the next restore here) once the
        # process has what it needs for now: when its faults go quiet (files.HOLD).
        fetcher.hold(blocks.by_digest)
        # The working set comes in batches where the source answers them (a fleet, an HTTP
        # store), and the stream hands each memory block to the handler as it lands: the
        # handler's threads asking for each in turn and waiting on the stream cost the stream's
        # thread a hand-over of the interpreter per block (first answer 0.01-0.05 s sooner at 1
        # and 10 Gbit/s; docs/snapshots-measured.md). What the stream does not bring, a fault or the
        # background fetch does. Elsewhere the handler's threads fetch the working set themselves.
        handler = Handler(blocks, fetcher,
                          lambda pid: parse_pagemap((images / f"pagemap-{pid}.img").read_bytes()),
                          killer, on_stalled=lambda: _stop_criu(peer, stop, parent),
                          on_quiet=fetcher.release_held, wiped=snapfmt.wipe_on_fork(snap.meta))
        # The image's blocks come in the same stream, in the order the first restore touched
        # them both (the image mount then finds them in the node cache and does not prefetch
        # them itself, restore.mount_profile): two streams side by side gave the image blocks
        # the process reads only after its first answer the same share of the link as the
        # memory it needs for it.
        sizes = {blocks.digests[k]: blocks.sizes[k] for k in plan}
        if fetcher.stream([(b.digest, sizes.get(b.digest, b.size)) for b in touched],
                          on_block=handler.arrived):
            status["working_set_image_blocks"] = len(touched) - len(plan)
        else:
            status["working_set_image_blocks"] = 0
            handler.prefetch(plan)
        status["t0"] = handler.t0  # (CLOCK_MONOTONIC: one clock for every process on the node)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = images / f".{SOCKET_NAME}.{os.getpid()}"
        listener.bind(str(tmp))
        listener.listen(1)
        os.rename(tmp, images / SOCKET_NAME)  # appears only once it accepts
        threading.Thread(target=_link, args=(listener, handler, stop, peer), daemon=True).start()
        threading.Thread(target=_watch_parent, args=(parent, handler, stop, peer), daemon=True).start()
        if ready_fd is not None:
            os.write(ready_fd, b"1")
        handler.serve(stop)
        status["error"] = handler.error
        status["failed_ahead_error"] = handler.failed_ahead
        status.update(handler.counts)
        status.update(fetcher.streamed())
        status["working_set"] = _working_set(cfg, handler, profile is None)
    except Exception as exc:  # noqa: BLE001 - reported through the status file
        status["error"] = status.get("error") or f"{type(exc).__name__}: {exc}"
        log.error("lazy restore: %s", status["error"])
    finally:
        if terminated.is_set() and status["error"] is None and (
                handler is None or handler.tasks or not handler.finished):  # (all in: it runs on)
            status["error"], status["terminated"] = "the page server was stopped (SIGTERM)", True
            _stop_criu(peer, stop, parent)  # (and the tree it made: criu may not have said which)
        if handler is not None:
            if handler.error is None and handler.tasks and (terminated.is_set() or not stop.is_set()):
                handler.fatal(status["error"] or "the page handler is exiting with pages missing")
            if handler.error is not None and killer is not None:
                killer()  # (a failure while criu restored waits for the tree no longer)
            if killer is not None:
                killer.wait()
            handler.close()
        tmp_status = cfg.status + ".tmp"
        Path(tmp_status).write_text(json.dumps(status))
        os.rename(tmp_status, cfg.status)
        # Then what is written behind lands, before this process exits (lazyfs run has the
        # status already: a slow disk here must never read as a failed restore). The memory can
        # be all in (faults, and the fetch threads, took what the stream had not reached) while
        # the stream still brings the image blocks the process reads later: it goes on until it
        # is done or lazyfs run, its tree gone, says stop.
        if fetcher is not None:
            fetcher.close(until=stop if status["error"] is None else None)
    return 0 if status["error"] is None else 3


def _stop_criu(peer: list[int], stop: threading.Event, parent: int) -> None:
    """SIGKILL criu restore (``peer``: pidfds) and the tree it was making, before any descriptor
    is let go (then stop waiting for the pid criu would have written). The tree's root is criu's
    sibling, a child of `lazyfs run` (``parent``, ours too) in a PID namespace of its own;
    `lazyfs run` then reports the failed block and starts the command cold. If `lazyfs run` is
    gone (our parent changed), its children are someone else's to judge: criu only."""
    for fd in peer:
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if os.getppid() == parent:
        procs.kill_made(parent, wait=10.0)
    stop.set()


def _watch_parent(parent: int, handler: Handler, stop: threading.Event, peer: list[int]) -> None:
    """`lazyfs run` gone (SIGKILL, the OOM killer) while this server still serves: nobody waits
    for the tree or reads the status, and criu restore may not even have connected yet, so the
    server would wait for ever. The tree and criu are killed (before any descriptor is let go),
    and the server stops."""
    try:
        fd = os.pidfd_open(parent)
    except ProcessLookupError:
        fd = None
    if fd is not None:
        spawn.readable(fd, None)  # readable once it has exited
        os.close(fd)
    if stop.is_set() or os.getppid() == parent:
        return  # (stopped first; or not our parent's pidfd after all)
    if handler.done_at is None:  # (all served: the tree needs nothing more, and may be gone)
        handler.fatal(f"lazyfs run (pid {parent}) exited while the restore was served")
    _stop_criu(peer, stop, parent)


def _working_set(cfg: Config, handler: Handler, none_yet: bool) -> list | None:
    """The blocks faulted in (or read ahead of faults), in first-touch order, as [digest, size,
    t]: `lazyfs run` publishes them, with the image blocks the process read, as the snapshot's
    working set (lazyrestore.record_working_set)."""
    if not (cfg.record and none_yet and handler.finished and handler.demanded and handler.error is None):
        return None
    b = handler.blocks
    return [[b.digests[key], b.sizes[key], t] for key, t in handler.demanded]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", required=True)
    p.add_argument("--snapshot", required=True)
    p.add_argument("--pidfile", required=True)
    p.add_argument("--status", required=True)
    p.add_argument("--cache-dir")
    p.add_argument("--no-working-set", dest="working_set", action="store_false")
    p.add_argument("--no-record", dest="record", action="store_false")
    p.add_argument("--ready-fd", type=int)
    Source.add_arguments(p)
    a = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    cfg = Config(a.images, a.snapshot, Source.from_namespace(a), a.cache_dir, a.pidfile, a.status,
                 a.working_set, a.record)
    return serve(cfg, a.ready_fd)


def serve(cfg: Config, ready_fd: int | None = None, known: tuple | None = None) -> int:
    """``run`` as the page server's own process (forked from `lazyfs run`, or its own program)."""
    syscalls.set_name(NAME)
    return run(cfg, ready_fd, known)


if __name__ == "__main__":
    sys.exit(main())

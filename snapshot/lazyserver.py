"""The lazy-pages process of `lazyfs run --restore`: receives the userfaultfds from
`criu restore --lazy-pages` and serves the snapshot's memory from verified blocks until every
page is in (lazypages.Handler), then records the working set and writes a status file.

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

from lazyfs import profiles
from lazyfs.format import snapshot as snapfmt
from lazyfs.format.profile import Profile, ProfileBlock
from lazyfs.remote.source import Source
from lazyfs.store import objects, open_store
from snapshot.criuimg import parse_pagemap
from snapshot.files import block_fetcher
from snapshot.lazypages import Blocks, Handler

log = logging.getLogger("lazyfs.snapshot.lazy")
RESTORE_FINISHED = 0x52535446  # criu/uffd.c LAZY_PAGES_RESTORE_FINISHED
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
    record: bool = True  # publish the working set if none was recorded yet
    publish_to: str | None = None  # store spec to publish it to (default: the source's store)

    def args(self) -> list[str]:
        out = ["--images", self.images, "--snapshot", self.snapshot, "--pidfile", self.pidfile,
               "--status", self.status, *self.source.args()]
        if self.cache_dir:
            out += ["--cache-dir", self.cache_dir]
        if self.publish_to:
            out += ["--publish-to", self.publish_to]
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


def _link(listener: socket.socket, handler: Handler, stop: threading.Event) -> None:
    """criu restore's side: (pid, uffd) per task, then RESTORE_FINISHED."""
    try:
        conn, _ = listener.accept()
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
                handler._poke()
    except (EOFError, OSError) as exc:
        log.info("criu restore hung up before it finished (%s)", exc or "EOF")
        stop.set()
    except BaseException as exc:  # noqa: BLE001 - a task we cannot serve must not run
        handler.fatal(f"cannot serve the restored task: {exc}")
    finally:
        handler._poke()


def _killer(pidfile: str):
    def kill() -> None:
        def wait_and_kill() -> None:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    pid = int(Path(pidfile).read_text())
                except (OSError, ValueError):
                    time.sleep(0.01)
                    continue
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
        if Path(pidfile).exists():
            wait_and_kill()
        else:  # criu restore is still running: kill the tree the moment it exists
            threading.Thread(target=wait_and_kill, daemon=True).start()
    return kill


def run(cfg: Config, ready_fd: int | None = None) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    status: dict = {"error": None}
    handler = None
    try:
        reader = cfg.source.open()
        snap = snapfmt.decode(objects.read_manifest_bytes(reader, cfg.snapshot))
        blocks = Blocks()
        for f in snap.files:
            name = f.name.rpartition("/")[2]
            if f.name.startswith("criu/pages-") and name.endswith(".img"):
                blocks.add_file(name, f.chunks)
        profile = profiles.load(reader, cfg.snapshot) if cfg.working_set else None
        first = {}
        for key, digest in enumerate(blocks.digests):
            first.setdefault(digest, key)
        plan = [first[b.digest] for b in profile.blocks if b.digest in first] if profile else []
        status["working_set_blocks"] = len(plan)
        images = Path(cfg.images)
        handler = Handler(blocks, block_fetcher(cfg.source, cfg.cache_dir, reader),
                          lambda pid: parse_pagemap((images / f"pagemap-{pid}.img").read_bytes()),
                          _killer(cfg.pidfile), working_set=plan)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = images / f".{SOCKET_NAME}.{os.getpid()}"
        listener.bind(str(tmp))
        listener.listen(1)
        os.rename(tmp, images / SOCKET_NAME)  # appears only once it accepts
        threading.Thread(target=_link, args=(listener, handler, stop), daemon=True).start()
        if ready_fd is not None:
            os.write(ready_fd, b"1")
        handler.serve(stop)
        status["error"] = handler.error
        status.update(handler.counts)
        status["working_set_recorded"] = _record(cfg, handler, profile is None)
    except Exception as exc:  # noqa: BLE001 - reported through the status file
        status["error"] = status.get("error") or f"{type(exc).__name__}: {exc}"
        log.error("lazy restore: %s", status["error"])
    finally:
        if handler is not None:
            if handler.error is None and handler.tasks and not stop.is_set():
                handler.fatal("the page handler is exiting with pages missing")
            elif handler.tasks and stop.is_set():
                pass  # lazyfs run says the restored tree has exited: nothing left to protect
            handler.close()
        tmp_status = cfg.status + ".tmp"
        Path(tmp_status).write_text(json.dumps(status))
        os.rename(tmp_status, cfg.status)
    return 0 if status["error"] is None else 3


def _record(cfg: Config, handler: Handler, none_yet: bool) -> int:
    """Publish the blocks faulted in, in first-touch order, as the snapshot's working set."""
    if not (cfg.record and none_yet and handler.finished and handler.demanded and handler.error is None):
        return 0
    spec = cfg.publish_to or cfg.source.store
    if spec is None:
        return 0
    blocks = handler.blocks
    seen, out = set(), []
    for key, t in handler.demanded:
        if blocks.digests[key] not in seen:
            seen.add(blocks.digests[key])
            out.append(ProfileBlock(blocks.digests[key], blocks.sizes[key], t))
    try:
        profiles.publish(open_store(spec), Profile(cfg.snapshot, tuple(out),
                                                   {"recorded": time.time(), "kind": "snapshot working set",
                                                    "faults": handler.counts["faults"]}))
    except Exception as exc:  # noqa: BLE001 - a read-only store: the next restore just records again
        log.warning("could not publish the snapshot's working set: %s", exc)
        return 0
    return len(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", required=True)
    p.add_argument("--snapshot", required=True)
    p.add_argument("--pidfile", required=True)
    p.add_argument("--status", required=True)
    p.add_argument("--cache-dir")
    p.add_argument("--publish-to")
    p.add_argument("--no-working-set", dest="working_set", action="store_false")
    p.add_argument("--no-record", dest="record", action="store_false")
    p.add_argument("--ready-fd", type=int)
    Source.add_arguments(p)
    a = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if os.environ.get("LAZYFS_PAGES_DEBUG") else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    cfg = Config(a.images, a.snapshot, Source.from_namespace(a), a.cache_dir, a.pidfile, a.status,
                 a.working_set, a.record, a.publish_to)
    return run(cfg, a.ready_fd)


if __name__ == "__main__":
    sys.exit(main())

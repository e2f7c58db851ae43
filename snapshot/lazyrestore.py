"""The parts of `lazyfs run --restore` that make it lazy: fetch only what `criu restore` itself
reads, and run the page server (snapshot.lazyserver) that feeds the rest on demand."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import logging

from lazyfs.records import profiles
from lazyfs.errors import LazyfsError, RunError
from lazyfs.format.profile import WORKING_SET, Profile, ProfileBlock
from lazyfs.proc import spawn
from lazyfs.fs.index import ImageIndex
from lazyfs.source.spec import Source
from lazyfs.records import objects
from lazyfs.store import open_store
from snapshot.criuimg import parse_pagemap
from snapshot.files import fetch, is_pages
from snapshot.lazyserver import SOCKET_NAME, Config, serve as serve_pages


log = logging.getLogger("lazyfs.snapshot")


class LazyRestoreFailed(RunError):
    """The restored process needed memory that could not be fetched; it has been killed."""


def fetch_eager(fetch_block, files, root: Path) -> int:
    """Every file but the pages files in full; of those, only the pages CRIU restores itself
    (stacks, file-backed and shared memory: whatever its pagemaps do not flag lazy). The
    pagemaps, which say which those are, come first; everything else then in one go."""
    pagemaps = [f for f in files if f.name.startswith("criu/pagemap-")]
    done = fetch(fetch_block, pagemaps, root)
    eager: dict[str, list[tuple[int, int]]] = {f.name: [] for f in files if is_pages(f.name)}
    for path in sorted((root / "criu").glob("pagemap-*.img")):
        pm = parse_pagemap(path.read_bytes())
        eager.setdefault(f"criu/{pm.pages_file}", []).extend(pm.eager())
    return done + fetch(fetch_block, [f for f in files if f not in pagemaps], root, only=eager)


class PageServer:
    """The lazy-pages process for one restore: started before `criu restore --lazy-pages`
    connects, told to stop once the restored tree has exited."""

    def __init__(self, cfg: Config, log_file: Path, known: tuple | None = None):
        """Start it; ``ready()`` waits until it serves. In between, the restore mounts the image
        and fetches criu's files, which do not need it (its readiness came 12 ms after the fork,
        on the start path, while it set up and sent its first batch request)."""
        self.cfg = cfg
        self.log_file = log_file
        read_fd, write_fd = os.pipe()
        args = [sys.executable, "-m", "snapshot.lazyserver", *cfg.args(), "--ready-fd", str(write_fd)]
        self.proc = None
        self._ready_fd: int | None = read_fd
        try:
            with spawn.holding_sigint():  # a Ctrl-C now comes once the handle is ours
                # (forked, it takes what lazyfs run read; as a program, it reads them itself)
                self.proc = spawn.start(args, lambda: serve_pages(cfg, write_fd, known),
                                        log_file, write_fd)
        except BaseException:
            self._close_ready()
            raise
        finally:
            os.close(write_fd)

    def ready(self, timeout: float = 30.0) -> None:
        """Wait until it serves (before criu restore connects to it); RunError if it never does,
        and then it is reaped: it must not serve on, alone."""
        if self._ready_fd is None:
            return
        try:
            ok = spawn.wait_ready(self._ready_fd, self.proc, timeout)
        except BaseException:  # a Ctrl-C while it started
            self._reap()
            raise
        finally:
            self._close_ready()
        if not ok:
            self._reap()
            raise RunError(f"the lazy page server did not start: {self.failure()}")

    def _close_ready(self) -> None:
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None

    def _reap(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def socket(self) -> Path:
        return Path(self.cfg.images) / SOCKET_NAME

    def status(self) -> dict:
        try:
            return json.loads(Path(self.cfg.status).read_text())
        except (OSError, ValueError):
            return {}

    def failure(self) -> str:
        err = self.status().get("error")
        if err:
            return err
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return " / ".join(lines[-3:]) or "(no log)"

    def finish(self, timeout: float = 30.0) -> dict:
        """After the restored tree has exited (or a restore given up): stop serving and return
        the status."""
        self._close_ready()
        if self.proc.poll() is None:
            try:
                # (SIGUSR1, "done": a SIGTERM, anyone's, makes it kill whatever tree still runs)
                os.kill(self.proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.status()



def record_working_set(source: Source, publish_to: str | None, snap_digest: str, image_digest: str,
                       page_blocks: list, trace_lines: list[str], meta: dict,
                       shift: float | None = None) -> int:
    """Publish a snapshot's working set: the page-image blocks its first lazy restore faulted in
    (from the page server) and the image blocks the restored process read through the mount
    (its read trace), each in first-touch order, as one profile of the snapshot (format.md §9).
    A later restore's page server streams it, memory and image blocks in one stream by touch time
    (from a local store or S3 it takes the page blocks, and the image mount the image's). So both
    count from the page server's start: ``shift`` is how long after it the mount was asked for
    (the trace counts from the mount's start, a little later still). Returns the number of
    blocks published (0 if the store takes no writes)."""
    reader = source.open()
    try:
        manifest = objects.read_manifest(reader, image_digest)
    finally:
        reader.close()
    blocks: list[ProfileBlock] = []
    seen: set[str] = set()
    pages = [ProfileBlock(d, int(n), float(t)) for d, n, t in page_blocks]
    image = profiles.from_trace(ImageIndex(manifest), profiles.parse_trace(trace_lines), shift)
    for b in pages + image:
        if b.digest not in seen:  # each once: identical memory makes identical blocks
            seen.add(b.digest)
            blocks.append(b)
    n_pages = len({b.digest for b in pages})
    try:
        profiles.publish(open_store(publish_to), Profile(snap_digest, tuple(blocks), {
            "kind": WORKING_SET, "page_blocks": n_pages,
            "image_blocks": len(blocks) - n_pages, **meta}))
    except LazyfsError as exc:  # a read-only store: the next restore records again
        log.warning("could not publish the snapshot's working set: %s", exc)
        return 0
    return len(blocks)

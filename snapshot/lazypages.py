"""Serving a lazily restored process's memory from verified blocks (userfaultfd).

`criu restore --lazy-pages` maps a restored task's private anonymous memory empty, registers it
with a userfaultfd and hands the descriptor over a Unix socket (the task's pid as an int, then
the descriptor; after the last task the word LAZY_PAGES_RESTORE_FINISHED). From then on a
thread touching a missing page sleeps until its page is copied in. This handler takes CRIU's
`lazy-pages` daemon's place so that:

- a fault fetches the whole block holding its page (a content-defined run of pages, ~256 KiB)
  at once and maps every missing page of it, ahead of everything else (pagefetch.py);
- a block that cannot be fetched or fails verification never becomes memory: the restored tree
  is killed (``on_fatal``) before this process lets go of the descriptors, which would make the
  kernel fill the missing pages with zeroes;
- the blocks faulted in, in first-touch order, are the snapshot's working set: published as a
  profile, the next restore fetches them before the process asks (REAP's idea);
- once faults go quiet the rest streams in the background, and a task whose every page is in
  is released (its descriptor closed), so later faults are the kernel's own again.

Which block holds which page of which task is pagetable.py's business.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections import defaultdict

from snapshot import uffd
from snapshot.criuimg import PAGE
from snapshot.pagefetch import BACKGROUND, DEMAND, NAMES, PROFILE, READAHEAD, ChunkFetcher
from snapshot.pagetable import Blocks, Task, lazy_runs

log = logging.getLogger("lazyfs.snapshot.lazy")
READAHEAD_MAX = 8  # blocks ahead of a run of faults walking memory in order
QUIET = 0.3  # seconds without a fault before the background transfer starts
# Seconds criu restore has to finish building the tree after a block failed: it does not read
# lazy memory itself in practice, but if it did, it would wait on that block for ever.
BUILD_BOUND = 30.0


class Handler:
    def __init__(self, blocks: Blocks, fetch_block, pagemap_for, on_fatal, working_set=(),
                 workers: int = 8, on_stalled=lambda: None, build_bound: float = BUILD_BOUND,
                 on_quiet=lambda: None, wiped=None):
        self.blocks = blocks
        # image pid -> the memory a restore zeroes (snapshot/wipe.py): never served from a block
        self.wiped = wiped or {}
        self.pagemap_for = pagemap_for  # image pid -> PageMap
        self.on_fatal = on_fatal  # kills the restored tree; called before any descriptor closes
        # kills criu restore, when it has not finished ``build_bound`` s after a failed block
        self.on_stalled = on_stalled
        self.on_quiet = on_quiet  # once, when faults first go quiet after the tree runs
        self.build_bound = build_bound
        self._failed_at = 0.0
        self.tasks: list[Task] = []
        self.lock = threading.RLock()
        self.early: dict[int, bytes] = {}  # blocks that arrived before their task was live
        self.finished = False  # criu restore said RESTORE_FINISHED
        self.error: str | None = None
        self._until_built = False  # the error waits for criu to finish building the tree
        # (key, seconds since start) of each block the tree asked for, directly or by walking
        # memory in order (readahead): the working set
        self.demanded: list[tuple[int, float]] = []
        self._demanded: set[int] = set()
        self.t0 = time.monotonic()
        self.last_fault = self.t0
        self.background_at: float | None = None
        self.done_at: float | None = None
        self.counts = defaultdict(int)
        self._wake_r, self._wake_w = os.pipe()
        self._closing: list[int] = []
        self._again: list[tuple[Task, int, bytes]] = []  # copies to try once events are read
        self._waited: set[int] = set()  # blocks a fault waits on, until they are delivered
        self.failed_ahead: str | None = None  # the last block fetched ahead that failed, and why
        self.fetcher = ChunkFetcher(lambda k: fetch_block(blocks.digests[k], blocks.sizes[k]),
                                    self._deliver, self._fail, workers=workers)
        self.prefetch(working_set)

    def prefetch(self, keys) -> None:
        """Fetch these blocks (the recorded working set) ahead of the faults, in this order."""
        for key in keys:
            self.fetcher.want(key, PROFILE)

    # --- tasks arriving from criu restore -------------------------------------------------------
    def add_task(self, pid: int, fd: int) -> None:
        pagemap = self.pagemap_for(pid)
        task = Task(f"pid {pid}", fd, pagemap.pages_file)
        task.track_runs(self.blocks, lazy_runs(pagemap, self.wiped.get(pid, ())))
        with self.lock:
            self.tasks.append(task)
            self.counts["lazy_pages"] += task.pages_missing
        self.poke()  # the loop starts watching its descriptor
        log.debug("%s: %d lazy pages in %d blocks", task.name, task.pages_missing, len(task.missing))

    def restore_finished(self) -> None:
        with self.lock:
            self.finished = True
            self.last_fault = time.monotonic()  # the quiet period starts when the tree runs
            self.counts["finished_ms"] = self._ms()
            if self.error is not None:  # failed while criu restored: the tree goes now
                self.on_fatal()
            for task in self.tasks:
                self._make_live(task)
            self.early.clear()
        self.poke()

    def _make_live(self, task: Task) -> None:
        task.live = True
        for key, data in list(self.early.items()):
            if key in task.missing:
                self._copy(task, key, data)
        self._maybe_release(task)

    # --- blocks arriving from the fetcher (worker threads) --------------------------------------
    def arrived(self, digest: str, data: bytes) -> None:
        """A verified block a stream brought (the working set): mapped in wherever it is missing.
        Any other digest (the image's, in the same stream) is not this handler's."""
        keys = self.blocks.by_digest.get(digest)
        if keys:
            self._deliver(keys[0], data, PROFILE)

    def _deliver(self, key: int, data: bytes, prio: int) -> None:
        log.debug("block %d arrived (%d bytes, %s)", key, len(data), NAMES[prio])
        with self.lock:
            self._waited.difference_update(self.blocks.by_digest[self.blocks.digests[key]])
            self.counts[f"{NAMES[prio]}_blocks"] += 1
            self.counts[f"{NAMES[prio]}_bytes"] += len(data)
            for same in self.blocks.by_digest[self.blocks.digests[key]]:
                if not self.finished:  # tasks may still be on their way
                    self.early[same] = data
                for task in list(self.tasks):
                    if same in task.missing and task.live:
                        self._copy(task, same, data)
                        self._maybe_release(task)
        self.poke()

    def _fail(self, key: int, exc: BaseException) -> None:
        """A block that could not be fetched. Once criu has built the tree, only a fault waiting
        on it kills the tree: one fetched ahead (readahead, the working set, the background
        transfer) stays missing, and a fault on it later fetches it again; the program may well
        end without it, and killing it meant starting it again cold."""
        with self.lock:
            missing = any(key in t.missing for t in self.tasks)
            needed = not self.finished or (missing and key in self._waited)
            if missing and not needed:
                self.counts["failed_ahead"] += 1
                self.failed_ahead = f"block {self.blocks.digests[key]}: {exc}"
        why = f"block {self.blocks.digests[key]} of the snapshot's memory could not be fetched: {exc}"
        if needed:
            self.fatal(why, until_built=True)
        elif missing:
            log.warning("%s; left missing: a fault on it fetches it again", why)

    def fatal(self, why: str, until_built: bool = False) -> None:
        """The restored tree must not run on: it is killed before a descriptor is let go.
        ``until_built``: a block could not be fetched while criu restore may still be building
        the tree; then it is served on (criu may touch other memory as it restores; a restore
        stalled on the server would hold everything up) and killed when criu says it is done
        (restore_finished). Any other failure kills at once (on_fatal waits for the tree)."""
        with self.lock:
            if self.error is None:
                self.error = why
                self._until_built = until_built and not self.finished
                self._failed_at = time.monotonic()
                if not self._until_built:
                    log.error("lazy restore failed: %s; killing the restored process", why)
                    self.on_fatal()
                else:
                    log.error("lazy restore failed: %s; the restored process is killed as soon "
                              "as criu restore has made it", why)
            elif self._until_built and not until_built:  # then a failure that cannot wait
                self._until_built = False
                log.error("lazy restore: %s as well; killing the restored process", why)
                self.on_fatal()
        self.poke()

    def _check_built(self) -> None:
        """A tree criu has not finished building ``build_bound`` s after a block failed: criu
        itself waits on that memory, and would for ever. Stop criu, and the tree with it."""
        with self.lock:
            if not self._until_built or self.finished or \
                    time.monotonic() - self._failed_at < self.build_bound:
                return
            self._until_built = False
            log.error("lazy restore: criu restore has not finished %.0f s after the failure; "
                      "stopping it and the restored process", self.build_bound)
            self.on_stalled()
            self.on_fatal()

    def failed(self) -> bool:
        """An error, and nothing more to serve (a tree still being built is served on)."""
        return self.error is not None and (self.finished or not self._until_built)

    def _copy(self, task: Task, key: int, data: bytes) -> None:
        """Map every missing page of block ``key`` into ``task`` (lock held)."""
        runs = task.take(key)
        for i, (page, off, count) in enumerate(runs):
            try:
                rc, done = uffd.copy_run(task.fd, page, off, count, data)
            except OSError as exc:  # (the benign errnos come back as values)
                self.fatal(f"mapping block {self.blocks.digests[key]} into {task.name} failed: {exc}")
                return
            if rc in (errno.ESRCH, errno.ENOSPC):
                self._gone(task)
                return
            self.counts["copied_pages"] += done
            if rc == errno.EAGAIN:
                self._copy_later(task, key, data, [(page + done, off + done * PAGE, count - done),
                                                   *runs[i + 1:]])
                return

    def _copy_later(self, task: Task, key: int, data: bytes, runs) -> None:
        """EAGAIN: the process's memory map is changing (a fork, mremap or madvise whose event
        this handler has not read yet), and the kernel copies nothing until it has. The pages
        are missing again, so that the event moves (or drops, or hands a forked child) them as it
        does the rest; the block is copied again once the loop has read the events."""
        task.put_back(key, runs)
        self._again.append((task, key, data))
        self.counts["copies_deferred"] += 1
        self.poke()

    def _copy_again(self) -> None:
        """The copies the kernel refused while a memory map changed (lock held)."""
        again, self._again = self._again, []
        for task, key, data in again:
            if task in self.tasks and key in task.missing:
                self._copy(task, key, data)
                self._maybe_release(task)

    def _maybe_release(self, task: Task) -> None:
        if task.live and not task.missing and task in self.tasks:
            self._release(task)

    def _release(self, task: Task) -> None:
        # The loop thread closes it (after it stops polling it): a number closed under its feet
        # could come back as another task's descriptor.
        self.tasks.remove(task)
        self._closing.append(task.fd)
        self.poke()
        log.debug("%s: every page is in; released", task.name)

    def _gone(self, task: Task) -> None:
        log.debug("%s: the process has exited", task.name)
        task.forget()
        if task in self.tasks:
            self._release(task)

    # --- events from the restored processes (the loop thread) ------------------------------------
    def handle(self, task: Task, events: list[uffd.Event]) -> None:
        with self.lock:
            if not task.live:
                self._make_live(task)  # it runs, so its memory is registered
            for ev in events:
                if task not in self.tasks:
                    # Released part way (its last missing pages removed): a fork read in the
                    # same batch still has a child, whose descriptor is ours to serve or close.
                    if ev.kind == uffd.EVENT_FORK:
                        self._fork(task, ev.a)
                    continue
                if ev.kind == uffd.EVENT_PAGEFAULT:
                    self._fault(task, ev.a // PAGE)
                elif ev.kind in (uffd.EVENT_REMOVE, uffd.EVENT_UNMAP):
                    self._remove(task, ev)
                elif ev.kind == uffd.EVENT_REMAP:
                    self._remap(task, ev.a // PAGE, ev.b // PAGE, ev.c // PAGE)
                elif ev.kind == uffd.EVENT_FORK:
                    self._fork(task, ev.a)
            if task in self.tasks:
                self._copy_again()

    def _fault(self, task: Task, page: int) -> None:
        self.last_fault = time.monotonic()
        key = task.key_of(self.blocks, page)
        log.debug("%s: fault at %#x (block %s)", task.name, page * PAGE, key)
        if key is None:  # never had content (or just arrived): a zero page, or a wake-up
            self.counts["zero_faults"] += 1
            # EAGAIN (its memory map is changing): woken, the thread faults again once the
            # event is read, rather than sleep for ever
            if uffd.zeropage(task.fd, page * PAGE) in (errno.EEXIST, errno.ENOENT, errno.EAGAIN):
                uffd.wake(task.fd, page * PAGE)
            return
        self.counts["faults"] += 1
        self.counts.setdefault("first_fault_ms", self._ms())
        self.counts["last_fault_ms"] = self._ms()
        self._note(key)
        self._waited.add(key)
        self.fetcher.want(key, DEMAND)
        if task.last_key < key <= task.last_key + 1 + task.window:  # still walking forward
            # Blocks read ahead that the walk has passed were read: part of the working set.
            # Those it never reaches were a guess, and stay out of it.
            for k in task.ahead:
                if k < key:
                    self._note(k)
            task.ahead = [k for k in task.ahead if k > key]
            task.window = min(READAHEAD_MAX, task.window * 2 or 1)
            for nxt in range(key + 1, key + 1 + task.window):
                if nxt in task.missing:
                    task.ahead.append(nxt)
                    self.fetcher.want(nxt, READAHEAD)
        elif key != task.last_key:
            task.window = 0
            task.ahead = []
        task.last_key = key

    def _note(self, key: int) -> None:
        if key not in self._demanded:
            self._demanded.add(key)
            self.demanded.append((key, round(time.monotonic() - self.t0, 4)))

    def _remove(self, task: Task, ev: uffd.Event) -> None:
        task.drop(self.blocks, ev.a // PAGE, (ev.b + PAGE - 1) // PAGE)
        if ev.kind == uffd.EVENT_REMOVE:  # madvise(DONTNEED): the range reads as zeroes from now
            # The kernel's own faults there from now on. Where it cannot (ENOMEM), faults there
            # still come here and get zero pages, as the dropped range has no block; a process
            # that has gone shows on its next copy (ESRCH), so no answer here means gone: taken
            # for gone, a live process's missing pages would all read as zeroes.
            uffd.unregister(task.fd, ev.a, ev.b - ev.a)
        self._maybe_release(task)

    def _remap(self, task: Task, old: int, new: int, n: int) -> None:
        task.remap(self.blocks, old, new, n)

    def _fork(self, parent: Task, fd: int) -> None:
        """The child starts with the parent's memory as it was at fork. Pages copied into the
        parent since cannot be told apart, so every page the parent ever had lazily is copied
        into the child again (EEXIST for those it already has)."""
        child = Task(f"child of {parent.name}", fd, parent.pages_file)
        child.track_runs(self.blocks, parent.all_runs())
        child.live = True
        self.tasks.append(child)
        self.counts["forks"] += 1
        for key in child.missing:  # its own faults come first; this makes sure it completes
            self.fetcher.want(key, BACKGROUND)

    # --- the loop --------------------------------------------------------------------------------
    def poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _ms(self) -> int:
        return int((time.monotonic() - self.t0) * 1000)

    def _background(self) -> None:
        """Queue every block still missing somewhere (in address order), once faults are quiet."""
        with self.lock:
            keys = sorted({k for t in self.tasks for k in t.missing})
            self.background_at = time.monotonic()
            self.counts["background_ms"] = self._ms()
        for key in keys:
            self.fetcher.want(key, BACKGROUND)
        self.on_quiet()

    def serve(self, stop: threading.Event) -> None:
        """Run until every page of every task is in (after restore finished), an error, or
        ``stop``. Tasks arrive from another thread (add_task), which pokes the loop."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        watched: dict[int, Task] = {}
        try:
            while not stop.is_set() and not self.failed():
                with self.lock:
                    current = {t.fd: t for t in self.tasks}
                    closing, self._closing = self._closing, []
                    if self.finished and not self.tasks:
                        self.done_at = time.monotonic()
                        self.counts["done_ms"] = self._ms()
                for fd in set(watched) - set(current):
                    poller.unregister(fd)
                for fd in closing:
                    os.close(fd)
                if self.done_at is not None:
                    return
                for fd, task in current.items():
                    if watched.get(fd) is not task:
                        poller.register(fd, select.POLLIN)
                watched = current
                if (self.background_at is None and self.finished
                        and time.monotonic() - self.last_fault >= QUIET):
                    self._background()
                self._check_built()
                if self._again:  # (refused again after the event was read, before the change ended)
                    with self.lock:
                        self._copy_again()
                for fd, mask in poller.poll(50):
                    if fd == self._wake_r:
                        os.read(fd, 4096)
                    elif fd in watched:
                        self._read_events(watched[fd], mask)
        except BaseException as exc:
            self.fatal(f"the page handler broke: {exc!r}")
            raise
        finally:
            self.fetcher.stop()

    def _read_events(self, task: Task, mask: int) -> None:
        # Under the lock from the read to the handling: once a map change's event is read the
        # kernel lets the change finish, and a block copied in between would land where the
        # memory no longer is (mremap: its pages taken as copied, later faults given zero pages;
        # madvise: old bytes where the program was promised zeroes).
        with self.lock:
            if task not in self.tasks:
                return
            buf = b""
            if mask & select.POLLIN or not mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                try:
                    buf = os.read(task.fd, uffd.MSG_SIZE * 64)
                except BlockingIOError:
                    return
                except OSError as exc:
                    # Not the process gone (that reads as the end): a fork's event whose new
                    # descriptor this process cannot have (EMFILE, ENOMEM) stays queued, and
                    # letting go of the parent would leave both on zero pages.
                    self.fatal(f"cannot read {task.name}'s memory events: {exc.strerror or exc}")
                    return
            if not buf:  # hung up or at its end: the process has exited
                self._gone(task)
                return
            self.handle(task, uffd.parse(buf))

    def close(self) -> None:
        """Let go of every descriptor. Only after the tree is dead or every page is in."""
        with self.lock:
            for task in list(self.tasks):
                self._release(task)
            for fd in (*self._closing, self._wake_r, self._wake_w):
                os.close(fd)
            self._closing = []


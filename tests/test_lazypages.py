"""The lazy-restore page handler against a real userfaultfd, without CRIU: this process registers
a memory region of its own, hands the descriptor to a Handler as criu restore would, and reads
the region from another thread (through ctypes, which lets go of the GIL while it faults)."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import mmap
import os
import random
import struct
import threading
import time

import pytest

from lazyfs.errors import DigestMismatch
from snapshot import uffd
from snapshot.criuimg import PAGE, Extent, PageMap
from snapshot.lazypages import Blocks, Handler

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
SYS_USERFAULTFD = 323  # x86_64
FEATURES = 1 << 2 | 1 << 3 | 1 << 6  # EVENT_REMAP | EVENT_REMOVE | EVENT_UNMAP (no FORK: one process)
UFFDIO_API = (3 << 30) | (24 << 16) | (0xAA << 8) | 0x3F
UFFDIO_REGISTER = (3 << 30) | (32 << 16) | (0xAA << 8) | 0x00
PAGES = 256  # 1 MiB region


def _userfaultfd() -> int | None:
    fd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        return None
    fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("<QQQ", 0xAA, FEATURES, 0)), True)
    return fd


def _skip_reason() -> str | None:
    if os.uname().machine != "x86_64":
        return "the test's userfaultfd syscall number is x86_64's"
    fd = _userfaultfd()
    if fd is None:
        return f"userfaultfd is not available here ({os.strerror(ctypes.get_errno())})"
    os.close(fd)
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


class Memory:
    """A registered region and the 'pages file' its contents come from, cut into uneven blocks."""

    def __init__(self, fail: set[int] = frozenset()):
        self.content = random.Random(7).randbytes(PAGES * PAGE)
        self.addr = libc.mmap(None, PAGES * PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        self.fd = _userfaultfd()
        fcntl.ioctl(self.fd, UFFDIO_REGISTER,
                    bytearray(struct.pack("<QQQQ", self.addr, PAGES * PAGE, 1, 0)), True)
        self.chunks, off = [], 0
        for n in [3, 16, 1, 40, 8, 64, 24, 100]:  # pages per block, 256 in all
            data = self.content[off:off + n * PAGE]
            self.chunks.append((hashlib.sha256(data).hexdigest(), data))
            off += n * PAGE
        self.blocks = Blocks()
        self.blocks.add_file("pages-1.img", [("sha256:" + d, len(b)) for d, b in self.chunks])
        self.by_digest = {"sha256:" + d: b for d, b in self.chunks}
        self.fetched: list[str] = []
        self.fail = {"sha256:" + self.chunks[i][0] for i in fail}
        self.fatal_calls: list[str] = []

    def fetch(self, digest: str, size: int) -> bytes:
        self.fetched.append(digest)
        if digest in self.fail:
            raise DigestMismatch(digest, "sha256:" + "0" * 64)
        return self.by_digest[digest]

    def handler(self, working_set=(), **options) -> Handler:
        pm = PageMap(1, (Extent(self.addr, PAGES, 0, True),))
        h = Handler(self.blocks, self.fetch, lambda pid: pm,
                    lambda: self.fatal_calls.append("killed"), working_set=working_set, **options)
        h.add_task(1, self.fd)
        return h

    def read(self, offset: int, n: int) -> bytes:
        buf = ctypes.create_string_buffer(n)
        ctypes.memmove(buf, self.addr + offset, n)  # faults here, with the GIL released
        return buf.raw


def _serve(h: Handler):
    stop = threading.Event()
    t = threading.Thread(target=h.serve, args=(stop,), daemon=True)
    t.start()
    return stop, t


def test_faults_map_whole_blocks_and_the_rest_follows_in_the_background():
    mem = Memory()
    quiet: list[int] = []  # (when the node cache is given the held memory blocks to write)
    h = mem.handler(on_quiet=lambda: quiet.append(h.counts["faults"]))
    stop, t = _serve(h)
    h.restore_finished()
    off = 20 * PAGE + 100  # inside the 4th block (pages 20..59)
    assert mem.read(off, 5000) == mem.content[off:off + 5000]
    assert mem.fetched[0] == "sha256:" + mem.chunks[3][0]
    assert h.counts["faults"] >= 1
    t.join(10)  # quiet, then background: every page in, descriptor released
    assert quiet == [h.counts["faults"]] and quiet[0] >= 1  # once, after the faults
    assert not t.is_alive() and h.counts["done_ms"] > 0
    assert mem.read(0, PAGES * PAGE) == mem.content
    assert h.demanded[0][0] == 3 and mem.fatal_calls == []
    assert sorted(set(mem.fetched)) == sorted(mem.by_digest)  # each block at least once
    h.close()


def test_working_set_blocks_arrive_before_the_first_fault():
    mem = Memory()
    h = mem.handler(working_set=[5, 7])
    stop, t = _serve(h)
    h.restore_finished()
    for _ in range(200):
        if h.counts["profile_blocks"] == 2:
            break
        threading.Event().wait(0.01)
    off = 71 * PAGE  # block 5 (pages 68..131)
    assert mem.read(off, PAGE) == mem.content[off:off + PAGE]
    assert h.counts["faults"] == 0  # it was mapped before the process touched it
    stop.set()
    t.join(10)
    h.close()


def test_blocks_a_stream_hands_over_are_mapped_without_being_fetched_again():
    """A stream's blocks (arrived): mapped before the process touches them, kept until criu has
    finished when they come before, never fetched by the handler itself; a digest that is not
    the snapshot's memory (the image's, in the same stream) is left alone."""
    mem = Memory()
    h = mem.handler()
    stop, t = _serve(h)
    early, late = mem.chunks[5], mem.chunks[7]  # blocks 5 (pages 68..131) and 7 (156..255)
    h.arrived("sha256:" + early[0], early[1])  # before criu said it has finished
    h.arrived("sha256:" + "e" * 64, b"not memory")
    h.restore_finished()
    h.arrived("sha256:" + late[0], late[1])
    assert mem.read(71 * PAGE, PAGE) == mem.content[71 * PAGE:72 * PAGE]
    assert mem.read(200 * PAGE, PAGE) == mem.content[200 * PAGE:201 * PAGE]
    assert h.counts["faults"] == 0 and h.counts["profile_blocks"] == 2
    assert "sha256:" + early[0] not in mem.fetched and "sha256:" + late[0] not in mem.fetched
    stop.set()
    t.join(10)
    h.close()


def test_remapped_and_removed_memory(monkeypatch):
    import snapshot.lazypages
    monkeypatch.setattr(snapshot.lazypages, "QUIET", 2.0)  # no background before the madvise
    mem = Memory()
    h = mem.handler()
    stop, t = _serve(h)
    h.restore_finished()
    # Move the last 100 pages elsewhere (mremap waits until the handler has read the event).
    old = mem.addr + 156 * PAGE
    spot = libc.mmap(None, 100 * PAGE, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    new = libc.mremap(old, 100 * PAGE, 100 * PAGE, 1 | 2, spot)  # MAYMOVE | FIXED, onto our spot
    assert new == spot, os.strerror(ctypes.get_errno())
    buf = ctypes.create_string_buffer(PAGE)
    ctypes.memmove(buf, new + 10 * PAGE, PAGE)
    assert buf.raw == mem.content[166 * PAGE:167 * PAGE]
    # madvise(DONTNEED) before the pages came in: they read as zeroes, and are not fetched.
    assert libc.madvise(mem.addr, 3 * PAGE, 4) == 0
    assert mem.read(0, 3 * PAGE) == b"\0" * 3 * PAGE
    assert mem.read(3 * PAGE, PAGE) == mem.content[3 * PAGE:4 * PAGE]
    t.join(10)
    assert not t.is_alive()
    assert "sha256:" + mem.chunks[0][0] not in mem.fetched  # every page of block 0 was dropped
    ctypes.memmove(buf, new + 99 * PAGE, PAGE)
    assert buf.raw == mem.content[255 * PAGE:]
    libc.munmap(new, 100 * PAGE)
    h.close()


def test_a_block_that_comes_while_the_memory_map_changes_is_copied_once_the_event_is_read(monkeypatch):
    """While a process's map changes (mremap here; fork and madvise alike), the kernel refuses
    every copy (EAGAIN) until the handler has read the change's event. A block that comes then
    must stay missing and be copied afterwards: counted as copied, its pages would later read as
    zeroes (a fault finds nothing missing there and maps a zero page)."""
    import select
    import snapshot.lazypages
    monkeypatch.setattr(snapshot.lazypages, "QUIET", 30.0)  # no background transfer meanwhile
    mem = Memory()
    h = mem.handler()
    h.restore_finished()  # live, but no loop yet: nothing reads the descriptor's events
    old = mem.addr + 156 * PAGE  # block 7 moves (mremap waits until its event is read)
    spot = libc.mmap(None, 100 * PAGE, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    moved: list[int] = []
    mover = threading.Thread(target=lambda: moved.append(libc.mremap(old, 100 * PAGE, 100 * PAGE, 1 | 2, spot)),
                             daemon=True)
    mover.start()
    poller = select.poll()
    poller.register(mem.fd, select.POLLIN)
    assert poller.poll(5000), "the mremap's event never came"
    block = mem.chunks[5]  # pages 68..131, not moved
    h.arrived("sha256:" + block[0], block[1])
    assert h.counts["copies_deferred"] >= 1  # the kernel said EAGAIN
    stop, t = _serve(h)  # reads the event: the mremap completes, the copy is made
    mover.join(10)
    assert moved == [spot]
    assert mem.read(68 * PAGE, 64 * PAGE) == mem.content[68 * PAGE:132 * PAGE]
    assert "sha256:" + block[0] not in mem.fetched  # copied from what arrived, not fetched again
    buf = ctypes.create_string_buffer(PAGE)
    ctypes.memmove(buf, spot + 10 * PAGE, PAGE)
    assert buf.raw == mem.content[166 * PAGE:167 * PAGE]
    libc.munmap(spot, 100 * PAGE)  # (its unmap event needs the loop)
    stop.set()
    t.join(10)
    h.close()


def test_a_block_that_comes_between_reading_a_madvise_and_handling_it_is_not_copied(monkeypatch):
    """madvise(DONTNEED) waits until its event is read, then empties the range: from then on it
    reads as zeroes. A block delivered by another thread after that read but before the event is
    handled must wait for the handling: copied at once, it would put the snapshot's old bytes
    where the program was promised zeroes (allocators rely on them for calloc)."""
    import snapshot.lazypages
    monkeypatch.setattr(snapshot.lazypages, "QUIET", 30.0)  # no background transfer meanwhile
    mem = Memory()
    h = mem.handler()
    done: list[int] = []
    block = mem.chunks[0]  # pages 0..2
    parse = snapshot.lazypages.uffd.parse
    deliverers: list[threading.Thread] = []

    def parse_after_a_delivery(buf):
        for _ in range(100):  # the madvise goes on once its event is read
            if done:
                break
            time.sleep(0.01)
        if done and not deliverers:
            deliverer = threading.Thread(target=h.arrived, args=("sha256:" + block[0], block[1]), daemon=True)
            deliverer.start()
            deliverers.append(deliverer)
            deliverer.join(0.5)  # it copies now, or waits for the event to be handled
        return parse(buf)

    monkeypatch.setattr(snapshot.lazypages.uffd, "parse", parse_after_a_delivery)
    stop, t = _serve(h)
    h.restore_finished()
    advisor = threading.Thread(target=lambda: done.append(libc.madvise(mem.addr, 3 * PAGE, 4)), daemon=True)
    advisor.start()
    advisor.join(10)
    assert done == [0]
    for _ in range(500):  # (the loop thread sees the madvise return a moment after this one does)
        if deliverers:
            break
        time.sleep(0.01)
    assert deliverers, "the madvise's event never came"
    deliverers[0].join(10)
    assert mem.read(0, 3 * PAGE) == b"\0" * 3 * PAGE
    assert mem.read(3 * PAGE, PAGE) == mem.content[3 * PAGE:4 * PAGE]
    stop.set()
    t.join(10)
    h.close()


def test_a_madvise_the_kernel_cannot_unregister_leaves_the_rest_served(monkeypatch):
    """UFFDIO_UNREGISTER's ENOMEM also means "could not split the mapping" for a process that
    runs on (vm.max_map_count): its other missing pages must still be served, not zero-filled by
    letting go of its descriptor."""
    import snapshot.lazypages
    monkeypatch.setattr(snapshot.lazypages, "QUIET", 30.0)  # no background transfer meanwhile
    ioctl = uffd._ioctl

    def no_split(fd, request, arg, benign=uffd.BENIGN):
        if request == uffd.UFFDIO_UNREGISTER:
            return ioctl(fd, request, arg, benign) if errno.ENOMEM not in benign else errno.ENOMEM
        return ioctl(fd, request, arg, benign)

    monkeypatch.setattr(uffd, "_ioctl", no_split)
    mem = Memory()
    h = mem.handler()
    stop, t = _serve(h)
    h.restore_finished()
    assert libc.madvise(mem.addr, 3 * PAGE, 4) == 0
    assert mem.read(0, 3 * PAGE) == b"\0" * 3 * PAGE
    off = 200 * PAGE  # block 7, never touched before
    assert mem.read(off, PAGE) == mem.content[off:off + PAGE]
    assert mem.fatal_calls == []
    stop.set()
    t.join(10)
    h.close()


def test_a_block_that_fails_verification_kills_before_letting_go():
    """The handler must call on_fatal (in lazyfs: SIGKILL the restored tree) before it closes the
    descriptor, because closing it makes the kernel hand out zero pages."""
    mem = Memory(fail={1})
    h = mem.handler()
    stop, t = _serve(h)
    h.restore_finished()
    seen: list[tuple[bytes, list]] = []
    reader = threading.Thread(target=lambda: seen.append((mem.read(3 * PAGE, 16), list(mem.fatal_calls))),
                              daemon=True)
    reader.start()
    t.join(10)
    assert not t.is_alive() and "could not be fetched" in (h.error or "")
    assert mem.fatal_calls == ["killed"]
    h.close()  # only now may the blocked reader run on (with a zero page, as the kernel does)
    reader.join(10)
    data, fatal_before = seen[0]
    assert fatal_before == ["killed"]
    assert data == b"\0" * 16  # what a survivor would have seen: why the kill comes first


def test_a_task_whose_events_cannot_be_read_is_killed_before_letting_go(monkeypatch):
    """A read of a userfaultfd can fail for a process that lives on: a fork's event whose new
    descriptor this process cannot have (EMFILE, ENOMEM) stays queued. Taken for the process
    gone, its descriptor was let go, and it ran on zero pages."""
    import snapshot.lazypages
    mem = Memory()
    real_read = os.read

    def out_of_descriptors(fd, n):
        if fd == mem.fd:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_read(fd, n)

    monkeypatch.setattr(snapshot.lazypages.os, "read", out_of_descriptors)
    h = mem.handler()
    stop, t = _serve(h)
    h.restore_finished()
    seen: list[list] = []
    reader = threading.Thread(target=lambda: (mem.read(3 * PAGE, 16), seen.append(list(mem.fatal_calls))),
                              daemon=True)
    reader.start()
    t.join(10)
    assert not t.is_alive() and "Too many open files" in (h.error or "")
    assert mem.fatal_calls == ["killed"]
    h.close()
    reader.join(10)
    assert seen == [["killed"]]  # the kill came before the descriptor went


def test_a_fork_read_with_the_event_that_released_its_parent_is_served():
    """One read can bring a madvise that takes a task's last missing pages (the task is done and
    let go) and a fork after it: the child is still a task to serve, its descriptor watched."""
    mem = Memory()
    h = mem.handler()
    with h.lock:
        [task] = h.tasks
        h._make_live(task)
        child_r, child_w = os.pipe()  # (a descriptor for the child; no event ever comes on it)
        drop = uffd.Event(uffd.EVENT_REMOVE, mem.addr, mem.addr + PAGES * PAGE, 0)
        h.handle(task, [drop, uffd.Event(uffd.EVENT_FORK, child_r, 0, 0)])
        assert task not in h.tasks  # (every page dropped: nothing left to serve it)
        assert [t.fd for t in h.tasks] == [child_r] and h.counts["forks"] == 1
    h.close()
    os.close(child_w)


def test_a_block_fetched_ahead_that_fails_kills_only_once_a_fault_waits_on_it():
    """Once criu has built the tree, a block the background transfer (or readahead, or the
    working set) could not fetch is left missing: the program may end without it, and killing
    it meant running it again cold. A fault on it fetches it again; failing then, it kills."""
    mem = Memory(fail={7})
    h = mem.handler()
    stop, t = _serve(h)
    h.restore_finished()
    off = 20 * PAGE
    assert mem.read(off, PAGE) == mem.content[off:off + PAGE]
    deadline = time.monotonic() + 10
    while not h.counts["failed_ahead"] and time.monotonic() < deadline:
        time.sleep(0.02)  # (quiet, then the background transfer meets block 7)
    assert h.counts["failed_ahead"] == 1 and h.error is None and mem.fatal_calls == []
    assert mem.read(0, 100 * PAGE) == mem.content[:100 * PAGE]  # the rest is served on
    seen: list[list] = []
    reader = threading.Thread(target=lambda: (mem.read(200 * PAGE, 16), seen.append(list(mem.fatal_calls))),
                              daemon=True)
    reader.start()  # a fault on block 7: fetched again, failing again, with a fault waiting
    t.join(10)
    assert not t.is_alive() and "could not be fetched" in (h.error or "")
    assert mem.fatal_calls == ["killed"]
    h.close()
    reader.join(10)
    assert seen == [["killed"]]


def test_a_working_set_block_that_fails_while_criu_restores_kills_when_criu_is_done():
    """A block fails before criu restore has finished building the tree: the handler keeps
    serving (criu may still touch other memory), kills the tree only once criu says it is done,
    and only then stops (and may let go of the descriptor)."""
    mem = Memory(fail={5})
    h = mem.handler(working_set=[5])
    stop, t = _serve(h)
    for _ in range(500):
        if h.error:
            break
        threading.Event().wait(0.01)
    assert "could not be fetched" in (h.error or "") and mem.fatal_calls == []
    off = 20 * PAGE  # block 3, fine: still served while criu restores
    assert mem.read(off, PAGE) == mem.content[off:off + PAGE]
    assert t.is_alive() and mem.fatal_calls == []
    h.restore_finished()
    t.join(10)
    assert not t.is_alive() and mem.fatal_calls == ["killed"]
    h.close()


def test_a_tree_criu_never_finishes_after_a_failure_is_stopped_within_the_bound():
    """criu restore itself waiting on a failed block would never say it is done: after the bound
    the handler stops criu (on_stalled), then the tree, and only then stops serving."""
    mem = Memory(fail={5})
    h = mem.handler(working_set=[5], build_bound=0.5,
                    on_stalled=lambda: mem.fatal_calls.append("criu stopped"))
    stop, t = _serve(h)
    for _ in range(500):
        if h.error:
            break
        threading.Event().wait(0.01)
    assert h.error and mem.fatal_calls == []  # within the bound: served on
    t.join(10)
    assert not t.is_alive() and mem.fatal_calls == ["criu stopped", "killed"] and h.failed()
    h.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace of its own needs root")
@pytest.mark.parametrize("parent", ["lazyfs run", "gone"])
def test_stopping_criu_kills_the_tree_it_was_making_and_nothing_else(tmp_path, parent):
    """lazyserver._stop_criu, from a page server's place: its parent ('lazyfs run') has forked
    criu and has a tree root in a PID namespace of its own (what criu restores, as criu's
    sibling); both die, the parent and the page server's siblings in its own namespace live.
    A page server whose parent is no longer the one it started under kills criu only."""
    from lazyfs.proc import syscalls as sc
    from snapshot import lazyserver
    report = tmp_path / "report"
    pid = os.fork()
    if pid == 0:  # 'lazyfs run'
        code = 2
        try:
            go_r, go_w = os.pipe()
            criu = os.fork()
            if criu == 0:
                threading.Event().wait(60)
                os._exit(0)
            bystander = os.fork()  # a child in our own namespace (a mount daemon, say)
            if bystander == 0:
                threading.Event().wait(60)
                os._exit(0)
            server = os.fork()
            if server == 0:  # the page server, before the new namespace (it stays in ours)
                os.read(go_r, 1)
                stop = threading.Event()
                started_under = os.getppid() if parent == "lazyfs run" else -1
                lazyserver._stop_criu([os.pidfd_open(criu)], stop, started_under)
                os._exit(0 if stop.is_set() else 1)
            sc.unshare(sc.CLONE_NEWPID)
            root = os.fork()
            if root == 0:  # the restored root: init of its namespace
                threading.Event().wait(60)
                os._exit(0)
            os.write(go_w, b"x")
            server_status = os.waitpid(server, 0)[1]
            time.sleep(0.2)
            left_alone = os.waitpid(root, os.WNOHANG)[0] == 0
            if left_alone:
                os.kill(root, 9)
            gone = [os.waitpid(p, 0)[1] for p in (criu, root)] if left_alone else \
                [os.waitpid(criu, 0)[1]]
            alive = os.waitpid(bystander, os.WNOHANG)[0] == 0
            os.kill(bystander, 9)
            os.waitpid(bystander, 0)
            report.write_text(repr((os.waitstatus_to_exitcode(server_status), left_alone,
                                    [os.WIFSIGNALED(s) and os.WTERMSIG(s) for s in gone], alive)))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report.read_text() == repr((0, parent == "gone", [9, 9] if parent == "gone" else [9], True))


def test_a_failure_that_cannot_wait_kills_at_once_even_after_one_that_could():
    """criu hands over a task the server cannot track (lazyserver._link): no restore_finished
    will be read after that, so the kill cannot wait for it, whatever failed before."""
    mem = Memory(fail={5})
    h = mem.handler(working_set=[5])
    for _ in range(500):
        if h.error:
            break
        threading.Event().wait(0.01)
    assert h.error and mem.fatal_calls == []
    h.fatal("cannot serve the restored task: a broken pagemap")
    assert mem.fatal_calls == ["killed"] and h.failed()
    h.fetcher.stop()
    h.close()


def test_userfaultfd_messages_parse():
    msg = struct.pack("<BBHI", uffd.EVENT_PAGEFAULT, 0, 0, 0) + struct.pack("<QQQ", 0, 0x7f00_0000_1234, 0)
    rm = struct.pack("<BBHI", uffd.EVENT_REMAP, 0, 0, 0) + struct.pack("<QQQ", 0x1000, 0x9000, 0x2000)
    events = uffd.parse(msg + rm + b"\0" * 7)  # a torn tail is ignored
    assert events == [uffd.Event(uffd.EVENT_PAGEFAULT, 0x7f00_0000_1234),
                      uffd.Event(uffd.EVENT_REMAP, 0x1000, 0x9000, 0x2000)]
    assert uffd.UFFDIO_COPY == 0xC028AA03 and uffd.UFFDIO_ZEROPAGE == 0xC020AA04
    assert uffd.UFFDIO_WAKE == 0x8010AA02 and uffd.UFFDIO_UNREGISTER == 0x8010AA01
    assert errno.EEXIST in uffd.BENIGN


def test_a_page_server_that_cannot_start_says_why_and_leaves_no_process(tmp_path):
    """A page server that fails before it serves (here: its snapshot is not in the store) is
    reaped, and the restore says why: it never serves on, alone."""
    from lazyfs.errors import RunError
    from lazyfs.source.spec import Source
    from snapshot.lazyrestore import PageServer
    from snapshot.lazyserver import Config
    from snapshot.procs import children

    images = tmp_path / "criu"
    images.mkdir()
    snapshot = "sha256:" + "ab" * 32
    cfg = Config(str(images), snapshot, Source(str(tmp_path / "store")), str(tmp_path / "cache"),
                 str(tmp_path / "restored.pid"), str(tmp_path / "pages.json"))
    before = set(children(os.getpid()))
    pages = PageServer(cfg, tmp_path / "pages.log")  # (the restore mounts meanwhile)
    with pytest.raises(RunError, match=f"the lazy page server did not start: .*{snapshot}"):
        pages.ready()
    assert set(children(os.getpid())) <= before
    assert snapshot in json.loads((tmp_path / "pages.json").read_text())["error"]  # (kept)


def test_the_page_server_names_its_process(tmp_path):
    """`ps -o comm` and top tell the page server from the other forks of the node's interpreter
    (here it then fails at once: its snapshot is not in the store)."""
    from lazyfs.source.spec import Source
    from snapshot import lazyserver

    cfg = lazyserver.Config(str(tmp_path), "sha256:" + "cd" * 32, Source(str(tmp_path / "store")),
                            None, str(tmp_path / "restored.pid"), str(tmp_path / "pages.json"))
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            code = lazyserver.serve(cfg)
            with open("/proc/self/comm") as comm:
                os.write(write_fd, f"{code} {comm.read().strip()}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as r:
            said = r.read().decode()
    finally:
        os.waitpid(pid, 0)
    assert said == f"3 {lazyserver.NAME}" and lazyserver.NAME == "lazyfs-pages"
    with open("/proc/self/comm") as comm:
        assert comm.read().strip() != lazyserver.NAME  # the caller's is its own


def test_a_page_server_whose_restore_was_killed_does_not_serve_on(tmp_path):
    """`lazyfs run` killed with SIGKILL after it forked the page server, before criu restore
    connected: the server stops (it would otherwise wait for criu for ever, holding memory)."""
    from lazyfs.format import snapshot as snapfmt
    from lazyfs.source.spec import Source
    from snapshot import lazyserver

    images = tmp_path / "criu"
    images.mkdir()
    cfg = lazyserver.Config(str(images), "sha256:" + "ef" * 32, Source(str(tmp_path / "store")),
                            str(tmp_path / "cache"), str(tmp_path / "restored.pid"), str(tmp_path / "pages.json"))
    snap = snapfmt.Snapshot("sha256:" + "12" * 32, str(tmp_path / "at"), (), 0.0, {})
    read_fd, write_fd = os.pipe()
    restore = os.fork()
    if restore == 0:  # pragma: no cover - 'lazyfs run': forks the server, says its pid, waits
        try:
            server = os.fork()
            if server == 0:
                os.close(read_fd)
                os._exit(lazyserver.serve(cfg, known=(snap, None)))
            os.write(write_fd, f"{server}\n".encode())
            threading.Event().wait(60)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as r:
        server = int(r.readline())
    try:
        deadline = time.monotonic() + 10
        while not (images / lazyserver.SOCKET_NAME).exists():  # serving: waits for criu
            assert time.monotonic() < deadline, "the page server never listened"
            time.sleep(0.02)
        os.kill(restore, 9)
        os.waitpid(restore, 0)
        deadline = time.monotonic() + 15
        while _running(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(server), "the page server serves on without its restore"
        assert "exited while the restore was served" in json.loads((tmp_path / "pages.json").read_text())["error"]
    finally:
        for pid in (restore, server):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def _running(pid: int) -> bool:
    """Alive and not a zombie (the server is not our child: its reaper may be slow)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_copy_never_reads_past_the_bytes_it_is_given():
    with pytest.raises(ValueError):
        uffd.copy(-1, 0, b"x" * 4096, 4096, 4096)  # (refused before any ioctl: no descriptor needed)
    with pytest.raises(ValueError):
        uffd.copy(-1, 0, b"x" * 4096, 0, 8192)

"""The FUSE adapter (fusepy): the only place lazyfs errors become errno values.

Metadata comes from the ImageIndex; file bytes from the NodeCache, which verifies every block
against its digest before it is read, so nothing unverified ever reaches the kernel.
"""
from __future__ import annotations

import codecs
import errno
import logging
import os
import threading
import time

from fuse import FuseOSError, Operations

from lazyfs.cache.nodecache import NodeCache
from lazyfs.errors import LazyfsError
from lazyfs.fs.index import ImageIndex, Inode
from lazyfs.format import trace as tracefmt
from lazyfs.format.manifest import EntryType

log = logging.getLogger("lazyfs.fuse")

# fusepy decodes every path with one codec; names in images need not be UTF-8, so use UTF-8 with
# surrogateescape under a codec name of our own and turn paths back into the exact bytes.
CODEC = "lazyfs-fsname"
SIBLING_MAX_SIZE = 256 * 1024  # files up to this size pull their directory's small files along
SIBLING_MAX_FILES = 128
SIBLING_MAX_BYTES = 8 * 1024 * 1024


def _search(name):
    if name != CODEC.replace("-", "_") and name != CODEC:
        return None
    utf8 = codecs.lookup("utf-8")
    return codecs.CodecInfo(
        name=CODEC,
        encode=lambda s, errors="strict": utf8.encode(s, "surrogateescape"),
        decode=lambda b, errors="strict": utf8.decode(b, "surrogateescape"))


codecs.register(_search)


def _name(inode: Inode) -> str:
    """The image path of a file, for logs (on the kernel path FUSE sees only object names)."""
    return "/" + inode.entry.path.decode("utf-8", "backslashreplace")


def _b(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape").strip(b"/")


class LazyOps(Operations):
    use_ns = True  # times are integer nanoseconds

    def __init__(self, index: ImageIndex, cache: NodeCache, stats_extra=lambda: {}, trace=None,
                 readahead: int = 0, fetch_batch=None, siblings: bool = True, on_read=None,
                 recorder=None):
        self.index = index
        self.cache = cache
        self.readahead = readahead
        # Called with [(digest, size)] to fetch in one batch in the background: a directory's
        # small files (siblings), or the blocks after a miss in a large file (a library).
        self.fetch_batch = fetch_batch
        self.siblings = siblings
        self._dirs_seen: set[int] = set()
        self._read_end: dict[int, int] = {}  # inode -> where its last read ended
        self.stats_extra = stats_extra
        self.on_read = on_read  # called with the inode after each read (lazyfs.cache.completer)
        self.recorder = recorder  # lazyfs.records.profiles.Recorder: first touches, for a startup profile
        # Counted by many FUSE threads at once: under a lock (an unlocked += loses increments,
        # and copying the dict while another thread adds an op's first count fails).
        self._count_lock = threading.Lock()
        self.reads = 0
        self.read_bytes = 0
        self.ops: dict[str, int] = {}
        self.trace = trace  # a text file: one JSON line per read (workload analysis, profiles)
        self._trace_lock = threading.Lock()
        self._t0 = time.monotonic()

    def __call__(self, op, *args):
        # Count every request the kernel sends, by kind: the FUSE round trip is the unit of cost.
        with self._count_lock:
            self.ops[op] = self.ops.get(op, 0) + 1
        try:
            return getattr(self, op)(*args)
        except FuseOSError:
            raise  # the answer itself (ENOENT, ENOTDIR, ...)
        except LazyfsError as exc:  # e.g. a kernel-path mount whose manifest could not load
            log.error("EIO for %s %s: %s", op, args[:1], exc)
            raise FuseOSError(errno.EIO) from None
        except Exception as exc:  # noqa: BLE001 - a fault of ours, not the file's: EIO, never the
            # fault's own errno (ENOSPC of the node cache's disk is not the reader's) nor fusepy's
            # EINVAL for what it does not know
            log.exception("EIO for %s %s: %s", op, args[:1], exc)
            raise FuseOSError(errno.EIO) from None

    def _inode(self, path: str) -> Inode:
        inode = self.index.lookup(_b(path))
        if inode is None:
            raise FuseOSError(errno.ENOENT)
        return inode

    # -- metadata (never fetches) -------------------------------------------------------------
    def getattr(self, path, fh=None):
        return self.index.stat(self._inode(path))

    def readdir(self, path, fh):
        # A list, not a generator: a fault while listing must reach __call__ (EIO), not fusepy's
        # iteration of it (EINVAL).
        inode = self._inode(path)
        if inode.entry.type != EntryType.DIR:
            raise FuseOSError(errno.ENOTDIR)
        listing: list = [".", ".."]
        for name, child in self.index.listdir(inode):
            st = self.index.stat(child)
            listing.append((name.decode("utf-8", "surrogateescape"),
                            {"st_ino": st["st_ino"], "st_mode": st["st_mode"]}, 0))
        return listing

    def readlink(self, path):
        inode = self._inode(path)
        if inode.entry.type != EntryType.SYMLINK:
            raise FuseOSError(errno.EINVAL)
        return inode.entry.target.decode("utf-8", "surrogateescape")

    def getxattr(self, path, name, position=0):
        inode = self._inode(path)
        key = name.encode("utf-8", "surrogateescape")
        for k, v in inode.entry.xattrs:
            if k == key:
                return v
        raise FuseOSError(errno.ENODATA)

    def listxattr(self, path):
        return [k.decode("utf-8", "surrogateescape") for k, _ in self._inode(path).entry.xattrs]

    def statfs(self, path):
        blocks = (self.index.total_size + 4095) // 4096
        n = self.index.entry_count
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": blocks, "f_bfree": 0, "f_bavail": 0,
                "f_files": n, "f_ffree": 0, "f_favail": 0, "f_namemax": 255}

    def access(self, path, amode):
        self._inode(path)
        if amode & os.W_OK:
            raise FuseOSError(errno.EROFS)
        return 0

    # -- data -----------------------------------------------------------------------------------
    # Requests the kernel need not send for a read-only, immutable image: with these unset, libfuse
    # answers them itself (open/opendir succeed, release/flush are no-ops) without a Python
    # callback. Writes are refused by the kernel ("ro"); special files never reach open.
    open = opendir = release = releasedir = flush = None

    def read(self, path, size, offset, fh):
        inode = self._inode(path)
        # Whether this read waits for the network: only then is a library's next stretch
        # worth a batch (a warm node's reads of an unfinished object must not start fetches).
        batchable = len(inode.entry.chunks) > 1 and self.fetch_batch is not None and self.readahead
        missed = False
        parts = []
        try:
            for chunk, inner, n in inode.chunks_for(offset, size):
                if self.recorder is not None:
                    self.recorder.touched(chunk.digest, chunk.size)
                if batchable and not parts:
                    missed = not self.cache.on_disk(chunk.digest)
                parts.append(self.cache.read(chunk.digest, chunk.size, inner, n))
        except LazyfsError as exc:
            log.error("EIO reading %s (offset %d): block %s: %s", _name(inode), offset,
                      getattr(exc, "digest", None) or "?", exc)
            raise FuseOSError(errno.EIO) from None
        except OSError as exc:
            log.error("EIO reading %s (offset %d): node cache: %s", _name(inode), offset, exc)
            raise FuseOSError(errno.EIO) from None
        first = inode.ino not in self._read_end
        if first and self.siblings and self.fetch_batch and inode.entry.size <= SIBLING_MAX_SIZE:
            wanted = self._siblings(inode)
            if wanted:
                self.fetch_batch(wanted)
        sequential = self._read_end.get(inode.ino) == offset
        self._read_end[inode.ino] = offset + size
        if self.readahead and sequential:
            # Neighbouring blocks go out in parallel while the caller consumes this one.
            self.cache.prefetch((c.digest, c.size) for c in
                                inode.chunks_after(offset + size, self.readahead))
        elif missed:
            # The scattered page faults of an mmapped library (the dynamic linker's symbol
            # tables, relocations, then code) land mostly just after one another: the next
            # blocks come in one batch, after this read's own block (demand first). For the
            # bench's torch start this turns 282 misses in 9 libraries into about 110.
            wanted = [(c.digest, c.size) for c in inode.chunks_after(offset + size, self.readahead)]
            if wanted:
                self.fetch_batch(wanted)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if self.on_read:
            self.on_read(inode)
        with self._count_lock:
            self.reads += 1
            self.read_bytes += len(data)
        if self.trace:
            name = "/" + inode.entry.path.decode("utf-8", "surrogateescape")  # the image's path
            line = tracefmt.encode(tracefmt.Read(time.monotonic() - self._t0, name, offset,
                                                 len(data)))
            with self._trace_lock:
                try:
                    if self.trace is not None:  # (another reader's write may have failed)
                        self.trace.write(line + "\n")
                        self.trace.flush()
                except (OSError, ValueError) as exc:  # the trace's disk, not this read, failed
                    log.error("--trace: cannot write %s (%s); no more reads are traced",
                              getattr(self.trace, "name", "the trace"), exc)
                    self.trace = None
        return data

    def _siblings(self, inode: Inode) -> list[tuple[str, int]]:
        """The small files beside the first small file read in a directory: a Python import
        reads module after module of one package directory, each one round trip if fetched
        alone. Once per directory, bounded in files and bytes."""
        parent_path = inode.entry.path.rpartition(b"/")[0]
        parent = self.index.by_path.get(parent_path)
        if parent is None or parent.ino in self._dirs_seen:
            return []
        self._dirs_seen.add(parent.ino)
        prefix = parent_path + b"/" if parent_path else b""
        out, total = [], 0
        for name in self.index.children.get(parent.ino, ()):
            e = self.index.by_path[prefix + name].entry
            if e.type == EntryType.REG and 0 < e.size <= SIBLING_MAX_SIZE and len(e.chunks) == 1:
                out.append((e.chunks[0].digest, e.chunks[0].size))
                total += e.size
                if len(out) >= SIBLING_MAX_FILES or total >= SIBLING_MAX_BYTES:
                    break
        return out

    def stats(self) -> dict:
        with self._count_lock:
            counts = {"reads": self.reads, "read_bytes": self.read_bytes, "requests": dict(self.ops)}
        return {"cache": self.cache.stats.snapshot(), **counts, **self.stats_extra()}

    # Everything that would change the image is refused (the mount is also "ro").
    def _rofs(self, *args):
        raise FuseOSError(errno.EROFS)

    chmod = chown = create = link = mkdir = mknod = rename = rmdir = setxattr = removexattr = \
        symlink = truncate = unlink = utimens = write = _rofs

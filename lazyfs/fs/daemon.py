"""The FUSE daemon: one process per mount, serving an image until it is unmounted.

lazyfs.fs.mounts starts it (forked, or as ``python -m lazyfs.fs.daemon`` with DaemonArgs.argv())
and waits on its readiness pipe; everything it needs travels in one DaemonArgs.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from lazyfs import argv
from lazyfs.errors import LazyfsError, MetadataRefused
from lazyfs.cache import layout as cachelayout
from lazyfs.format import digest as digests
from lazyfs.fs import control, kernel
from lazyfs.proc import syscalls
from lazyfs.source.spec import Source
from lazyfs.records import objects

log = logging.getLogger("lazyfs.mount")
REFUSED = b"X"  # on the readiness pipe: the mount is refused (MetadataRefused), no fallback
DAEMON_NAME = "lazyfs-mount"  # every daemon's process name (/proc/PID/comm)
# The image never changes under a mount: the kernel may keep names, attributes and absences it
# learnt (FUSE attr/entry/negative timeouts, seconds) for a day.
IMMUTABLE = 86400


@dataclass(frozen=True)
class DaemonArgs:
    """What one daemon serves, and how: built by the mount client, read back by main()."""
    digest: str  # the image manifest, already resolved (and verified once by the client)
    source: Source
    cache_dir: str
    mountpoint: str = field(metadata={"argv": "positional"})
    ref: str = ""  # what the user called the image, for logs
    ready_fd: int | None = None  # gets b"1" once the kernel answers on the mountpoint
    debug: bool = False
    trace: str | None = None  # append every read (docs/format.md §10) to this file
    profile: str = "auto"  # startup profile to prefetch (lazyfs.records.profiles.load); "auto" also learns one
    workload: str | None = None  # the workload's key (lazyfs.format.profile.workload_key), if a run's
    # "kernel": serve only the data objects, on lazyfs.fs.kernel's FUSE layer below runtime_dir,
    # and answer b"K" when ready (the client mounts EROFS and the overlay); "fuse": the whole image
    # on the mountpoint, b"1". A kernel-path daemon whose tree the layout cannot hold falls back.
    layout: str = "fuse"
    runtime_dir: str = ""
    complete: bool = False  # fetch the rest of partly read files in the background
    cache_size: int | None = None  # trim the node cache to this many bytes as it grows (lazyfs.cache.cap)

    def argv(self) -> list[str]:
        """The daemon's command line (``python -m lazyfs.fs.daemon ARGV``): lazyfs.argv."""
        return argv.to_argv(self)

    @classmethod
    def parse(cls, args: list[str] | None = None) -> "DaemonArgs":
        p = argv.Parser(prog="lazyfs-daemon", description="internal: lazyfs FUSE daemon")
        argv.add_arguments(cls, p)
        return argv.from_namespace(cls, p.parse_args(args))


def serve(args: DaemonArgs) -> None:
    """Run the FUSE filesystem in this process until unmounted."""
    from fuse import FUSE

    from lazyfs.cache.nodecache import CLAIM_WAIT, NodeCache
    from lazyfs.cache.prefetcher import fetch_missing
    from lazyfs.proc.syscalls import cached_pages
    from lazyfs.fs.fuseops import CODEC, LazyOps

    digest, source, cache_dir, mountpoint = args.digest, args.source, args.cache_dir, args.mountpoint
    ready_fd, trace = args.ready_fd, args.trace
    if args.layout == "kernel":
        # Before anything is written into the cache: a temp directory a user could write would
        # let them swap what becomes a block the kernel serves unhashed.
        kernel.take_over(cache_dir)
    reader = source.open()
    # A claimed block (a batch prefetch fetching it) is waited for as long as two of the
    # source's deadlines; past that its batch is stuck, and its readers fetch for themselves.
    cache = NodeCache(cache_dir, reader.fetch_block, cap_bytes=args.cache_size,
                      claim_wait=min(CLAIM_WAIT, max(10.0, 2 * source.deadline)))
    prefetch: list = []  # the startup profile's Prefetcher (or None), once the manifest is in
    auto = None
    # A run's mount learns its workload's profile and hands it to its cache servers; a plain
    # mount is no workload, a traced one is recorded by hand (`lazyfs profile`), and a node
    # reading a store directly never writes it.
    if args.profile == "auto" and args.workload and not trace and source.takes_profiles():
        from lazyfs.fs.autoprofile import AutoProfile
        auto = AutoProfile(reader, digest, args.workload, {"ref": args.ref} if args.ref else {}).start()
    if auto:
        def was_read(digest: str) -> bool:
            pages = cached_pages(cache.path(digest))
            return pages is None or pages > 0  # a kernel that cannot say: count the guess
        auto.was_read = was_read
    handed = _handed_manifest(args)
    index, kernel_path, metadata_from = _index(reader, cache, args, prefetch, auto, handed)
    completer = None
    if kernel_path:
        from lazyfs.cache.completer import Completer
        completer = Completer(cache, cachelayout.objects_dir(cache_dir), background=args.complete).start()
    trace_file = open(trace, "a", encoding="utf-8", errors="surrogateescape") if trace else None

    def extra() -> dict:
        out = {"store": reader.stats.snapshot(), "digest": digest,
               "data_path": "kernel" if kernel_path else "fuse", "metadata": metadata_from,
               "manifest": "fetched" if handed is None else "handed"}
        if prefetch and prefetch[0]:
            out["prefetch"] = prefetch[0].stats.snapshot()
        if completer:
            out["complete"] = completer.stats.snapshot()
        if auto:
            out["learn"] = auto.stats()
        return out

    def guessed(missing) -> None:
        # On the kernel path the kernel reads the guesses it needs from the node cache, unseen
        # by this daemon (on the FUSE path every read comes here): lazyfs.fs.autoprofile tells
        # them apart at the end.
        if auto and auto.recording:
            for digest, size in missing:
                auto.recorder.touched(digest, size, guess=True)
            cache.drop_after_write.update(digest for digest, _ in missing)

    def batch(wanted) -> None:
        # A profile knows what the workload reads; guessing by directory or library would only
        # add bytes.
        if not (prefetch and prefetch[0]):
            fetch_missing(cache, reader.fetch_blocks, wanted, guessed if kernel_path else None)
    ops = LazyOps(index, cache, extra, trace_file, readahead=source.readahead,
                  recorder=auto.recorder if auto else None,
                  fetch_batch=batch, siblings=source.siblings,
                  on_read=(lambda inode: completer.read(index.object_of(inode), inode.entry.chunks))
                  if completer else None)
    if auto:
        def learnt() -> None:  # the contribution is made: record and drop nothing more
            ops.recorder = None
            cache.drop_after_write.clear()
        auto.after = learnt
    if ready_fd is not None:
        def init(path, _fd=ready_fd):
            os.write(_fd, b"K" if kernel_path else b"1")
            os.close(_fd)
        ops.init = init
    if kernel_path or not any(e.xattrs for e in index.manifest.entries):
        # The kernel (and overlayfs above us) asks for xattrs on nearly every lookup; answering
        # ENOSYS once makes it stop asking for the life of the mount. On the kernel path the
        # xattrs are in the EROFS image.
        ops.getxattr = ops.listxattr = None
    try:
        control_sock = control.serve(mountpoint, ops.stats)
    except OSError as exc:  # counters are a convenience: never fail a mount over them
        log.warning("no control socket for %s (%s): `lazyfs stats` will not answer", mountpoint, exc)
        control_sock = None
    target = str(kernel.layout(cache_dir, digest, args.runtime_dir).fuse) if kernel_path else mountpoint
    os.makedirs(target, exist_ok=True)
    log.info("mounting %s (%s) from %s on %s, cache %s, data path %s", args.ref or digest, digest,
             source.describe(), mountpoint, cache_dir,
             f"kernel (missing data through FUSE on {target})" if kernel_path else "fuse")
    FUSE(ops, target, foreground=True, nothreads=False, encoding=CODEC, ro=True,
         allow_other=_may_allow_other(), default_permissions=True, use_ino=True, kernel_cache=True,
         attr_timeout=IMMUTABLE, entry_timeout=IMMUTABLE, negative_timeout=IMMUTABLE,
         fsname=f"lazyfs:{digests.hex_part(digest)[:12]}", subtype="lazyfs", debug=args.debug)
    if control_sock:
        control_sock.close()
    if prefetch and prefetch[0]:
        prefetch[0].stop()
    if auto:
        auto.stop()
    if completer:
        completer.stop()
    cache.close()
    reader.close()
    log.info("unmounted %s", mountpoint)


def _index(reader, cache, args: DaemonArgs, prefetch: list, auto=None, raw: bytes | None = None):
    """The namespace this daemon serves, whether it is the kernel path's data namespace, and
    where the kernel path's EROFS image came from ("node": already here, "shipped": fetched as
    the build made it, "generated": made here from the manifest; None on the FUSE path).
    With the EROFS image on the node the kernel needs nothing from the manifest to serve the
    tree, so the manifest is decoded in the background and the mount answers at once. ``raw``:
    the manifest's verified bytes, when the mounting process handed them over."""
    from lazyfs.records import metadata
    from lazyfs.fs.dataindex import DataIndex, DeferredIndex
    from lazyfs.fs.index import ImageIndex
    from lazyfs.format import manifest as mf

    # The profile is looked up beside the index (a slow answer about it must not hold up the
    # index every read needs), and its prefetch starts once the manifest is decoded (it needs
    # only its block sizes), not the index.
    decoded: Future = Future()
    threading.Thread(target=lambda: prefetch.append(_prefetcher(reader, args, decoded, cache, auto)),
                     name="lazyfs-profile", daemon=True).start()

    def decoding(decode):
        """``decode``, its outcome handed to the profile's prefetch too (one decode per mount)."""
        def run():
            try:
                manifest = decode()
            except BaseException as exc:
                decoded.set_exception(exc)
                raise
            decoded.set_result(manifest)
            return manifest
        return run

    def load(index_type, decode):
        """The index of the manifest ``decode()`` gives."""
        # Without the cyclic collector while the manifest's tens of thousands of tuples are made
        # (it would walk them again and again, a quarter of the time, and finds no garbage);
        # frozen after, as they live as long as the mount.
        collecting = gc.isenabled()
        gc.disable()
        try:
            manifest = decode()
            index = index_type(manifest)
        finally:
            if collecting:
                gc.enable()
        gc.freeze()
        log.info("%s: %d entries, %d bytes", args.ref or args.digest, len(manifest.entries),
                 index.total_size)
        return index
    if args.layout == "kernel" and cachelayout.erofs_image(args.cache_dir, args.digest).exists():
        return DeferredIndex(lambda: load(DataIndex, decoding(
            lambda: mf.decode(raw) if raw else objects.read_manifest(reader, args.digest)))), True, "node"
    raw = raw or objects.read_manifest_bytes(reader, args.digest)
    if args.layout == "kernel" and mf.decode_meta(raw) is not None:
        # The index builds while the shipped image is fetched: it needs only the manifest, and
        # the kernel asks for objects as soon as the mount is up (a restore's criu, for the
        # first library it maps, waited 0.1-0.15 s for it when it started after the fetch).
        early = DeferredIndex(lambda: load(DataIndex, decoding(lambda: mf.decode(raw))))
        shipped = metadata.fetch(reader, args.digest, raw)
        if shipped is not None and \
                _keep_image(cache, args, shipped, "fetched the EROFS metadata image shipped with the image"):
            return early, True, "shipped"
        # Another EROFS layout version: this node makes its own image, from the decode under way
        # (not for one the cache cannot hold: the node's own is as large).
        manifest = decoded.result()
        if shipped is None and _kernel_image(manifest, cache, args):
            return early, True, "generated"
        return load(ImageIndex, lambda: manifest), False, None
    manifest = decoding(lambda: mf.decode(raw))()
    kernel_path = args.layout == "kernel" and _kernel_image(manifest, cache, args)
    return load(DataIndex if kernel_path else ImageIndex, lambda: manifest), kernel_path, \
        "generated" if kernel_path else None


def _handed_manifest(args: DaemonArgs) -> bytes | None:
    """The manifest's bytes as the mounting process handed them over (lazyfs.fs.mounts), if it
    did and they hash to the digest this daemon serves; the file is removed either way."""
    path = kernel.layout(args.cache_dir, args.digest, args.runtime_dir).manifest
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    path.unlink(missing_ok=True)
    if digests.compute(raw) != args.digest:
        log.warning("the manifest handed to this mount is not %s; fetching it", args.digest)
        return None
    return raw


def _kernel_image(manifest, cache, args: DaemonArgs) -> bool:
    """Make the EROFS image of this manifest on the node (an image built without one shipped);
    False (FUSE path) if the tree has something the layout cannot hold, or the image is larger
    than the node cache's cap."""
    from lazyfs.errors import KernelLayoutUnsupported
    from lazyfs.format import erofs, metaimage

    try:
        data = erofs.encode(manifest, uuid=metaimage.uuid_for(args.digest))
    except KernelLayoutUnsupported as exc:
        log.warning("serving %s through FUSE: %s", args.ref or args.digest, exc)
        return False
    return _keep_image(cache, args, data, "wrote the EROFS metadata image")


def _keep_image(cache, args: DaemonArgs, data: bytes, what: str) -> bool:
    """Put an EROFS image where the kernel path mounts it from: durably (the kernel parses it as
    it is on disk, with no check of its own), counted in the node cache's ledger. False if it is
    larger than the node cache's cap (the mount then serves through FUSE)."""
    from lazyfs.errors import LargerThanCache
    from lazyfs.fsutil import atomic_write

    image = cachelayout.erofs_image(args.cache_dir, args.digest)
    image.parent.mkdir(parents=True, exist_ok=True)
    cachelayout.tmp_dir(args.cache_dir).mkdir(parents=True, exist_ok=True)
    try:
        with cache.room(len(data)) as rename:
            atomic_write(image, data, cachelayout.tmp_dir(args.cache_dir), durable=True, rename=rename)
    except LargerThanCache as exc:
        log.warning("serving %s through FUSE: its EROFS metadata image: %s", args.ref or args.digest, exc)
        return False
    log.info("%s: %s (%d bytes)", what, image, len(data))
    return True


def _prefetcher(reader, args: DaemonArgs, decoded: Future, cache, auto=None):
    """Start fetching the image's startup profile, if it has one (or the one named), once
    ``decoded`` holds the manifest (its lookup does not wait for that)."""
    from lazyfs.records import profiles
    from lazyfs.cache.prefetcher import Prefetcher

    digest = args.digest
    prof = None
    try:
        prof = profiles.load(reader, digest, args.profile, args.workload)
    finally:
        if auto:
            auto.looked(prof)
    if prof is None or decoded.exception() is not None:  # (no manifest: the mount fails anyway)
        return None
    wanted = profiles.plan(prof, decoded.result(), digest)
    cache.keep_longer = {d for d, _ in wanted}  # under a cap, what the next start needs goes last
    log.info("startup profile: prefetching %d blocks (%d bytes)", len(wanted), sum(n for _, n in wanted))
    return Prefetcher(cache, reader.fetch_blocks, wanted).start()


def _may_allow_other() -> bool:
    """Containers run as other users need allow_other; FUSE grants it to root, and to others only
    when /etc/fuse.conf says user_allow_other."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = DaemonArgs.parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    return run_daemon(args)


def run_daemon(args: DaemonArgs) -> int:
    """serve(args) with its failures logged as one line and turned into an exit status."""
    syscalls.set_name(DAEMON_NAME)  # (forked, or its own program: every daemon starts here)
    try:
        serve(args)
    except RuntimeError as exc:  # fusepy's way of saying fuse_main failed; libfuse said why above
        log.error("FUSE mount failed (status %s)", exc)
        return 1
    except MetadataRefused as exc:  # no data path may serve an image whose own metadata is bad
        log.error("%s", exc)
        if args.ready_fd is not None:
            os.write(args.ready_fd, REFUSED)
        return 1
    except (LazyfsError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

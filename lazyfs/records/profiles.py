"""Startup profiles in a store: record one from a mount's reads, publish it, find it at mount.

The codec is lazyfs.format.profile; this module does the reading and writing around it. A profile
is made by hand (`lazyfs profile`, from a read trace) or by any node on its own: a mount records
the blocks its workload touched first (:class:`Recorder`) and contributes them, and the store's
profile of that image and workload becomes the merge of every contribution (:func:`contribute`,
run by a cache server for the nodes behind it, which may not write the store themselves).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterable

from lazyfs.errors import LazyfsError, NotFound
from lazyfs.format import digest as digests, kinds
from lazyfs.format import profile as proffmt, trace as tracefmt
from lazyfs.format.manifest import EntryType, Manifest
from lazyfs.format.profile import Profile, ProfileBlock
from lazyfs.records import objects
from lazyfs.records.imagestats import block_sizes
from lazyfs.store.base import BlockStore

log = logging.getLogger("lazyfs.profile")
AUTO, NONE = "auto", "none"


def parse_trace(lines: Iterable[str]) -> list[tracefmt.Read]:
    """The reads of a `--trace` file, in time order."""
    return tracefmt.decode_all(lines)


def from_trace(index, reads: list[tracefmt.Read], shift: float | None = None) -> list[ProfileBlock]:
    """The blocks the reads touched, each once, in first-touch order (``index``: the image's
    lazyfs.fs.index.ImageIndex, which maps a read to its chunks). Times count from the first
    read; with ``shift``, from ``shift`` seconds before the mount started (another clock's
    start: a snapshot working set's page server)."""
    t0 = (reads[0][0] if reads else 0.0) if shift is None else -shift
    seen: set[str] = set()
    out: list[ProfileBlock] = []
    for t, path, offset, size in reads:
        inode = index.lookup(path.encode("utf-8", "surrogateescape").strip(b"/"))
        if inode is None or inode.entry.type != EntryType.REG:
            continue
        for chunk, _, _ in inode.chunks_for(offset, size):
            if chunk.digest not in seen:
                seen.add(chunk.digest)
                out.append(ProfileBlock(chunk.digest, chunk.size, max(0.0, t - t0)))
    return out


def record(index, image_digest: str, trace_lines: Iterable[str], meta: dict) -> Profile:
    """The profile of a read trace (``index``: as for from_trace)."""
    reads = parse_trace(trace_lines)
    blocks = from_trace(index, reads)
    return Profile(image_digest, tuple(blocks), {"recorded": time.time(), "reads": len(reads),
                                                 "read_bytes": sum(r[3] for r in reads), **meta})


def publish(store: BlockStore, profile: Profile) -> str:
    """Store the profile and point its image's profile tag at it; returns the profile digest."""
    digest = objects.put_record(store, proffmt.encode(profile))
    store.put_tag(*proffmt.tag_for(profile.image), digest)
    return digest


def load(store: BlockStore, image_digest: str, choice: str = AUTO,
         workload: str | None = None) -> Profile | None:
    """The profile a mount of ``image_digest`` should prefetch.

    ``choice``: "auto" (the profile of this workload on the image that nodes recorded, else the
    image's own), "none", a profile digest, or an image reference whose profile to use (say, the
    previous build's). With "auto" any problem means no prefetch and a log line; a profile the
    user named must exist."""
    if choice == NONE:
        return None
    try:
        if choice == AUTO:
            if workload is not None:
                try:
                    found = store.get_tag(*proffmt.tag_for(image_digest, workload))
                    return proffmt.decode(objects.read_manifest_bytes(store, found))
                except NotFound:
                    pass
            target = proffmt.tag_for(image_digest)
        else:
            digest = choice if digests.is_valid(choice) else objects.resolve(store, choice)
            data = objects.read_manifest_bytes(store, digest)
            if kinds.kind(data) == kinds.PROFILE:
                return proffmt.decode(data)
            target = proffmt.tag_for(digest)  # an image: use the profile recorded for it
        try:
            profile_digest = store.get_tag(*target)
        except NotFound:
            if choice == AUTO:
                return None
            raise NotFound(f"no startup profile recorded for {choice} (tag {target[0]}:{target[1]}; "
                           "record one with `lazyfs profile`)") from None
        return proffmt.decode(objects.read_manifest_bytes(store, profile_digest))
    except NotFound:
        if choice != AUTO:
            raise
        return None
    except LazyfsError as exc:
        if choice != AUTO:
            raise
        log.warning("ignoring the startup profile of %s: %s", image_digest, exc)
        return None


def plan(profile: Profile, manifest: Manifest, image_digest: str) -> list[tuple[str, int]]:
    """The profile's blocks that this image references, in profile order. A profile recorded on
    another image (stale, or named by hand) still helps for the blocks the two share."""
    sizes = block_sizes(manifest)
    out = [(b.digest, sizes[b.digest]) for b in profile.blocks if b.digest in sizes]
    if profile.image != image_digest and profile.meta.get("kind") != proffmt.WORKING_SET:
        log.warning("startup profile was recorded on %s, not %s: %d of its %d blocks are in this "
                    "image", profile.image, image_digest, len(out), len(profile.blocks))
    return out


def contribute(store: BlockStore, manifest: Manifest, image_digest: str, start: Profile,
               workload: str | None) -> dict:
    """Merge one start's profile into the store's profile of (image, workload) and publish the
    result. Only blocks the image references count, with the sizes its manifest gives, at most
    MAX_CONTRIBUTION of them: what a node sends can cost later starts some bandwidth, bounded by
    the merge, and never a wrong byte. Two contributions merged at once may lose one of them
    (the tag is replaced, not compared and swapped): a profile is a hint, and the next start
    contributes again."""
    if start.image != image_digest:
        raise LazyfsError(f"a profile of {start.image} contributed for {image_digest}")
    sizes = block_sizes(manifest)
    own = [ProfileBlock(b.digest, sizes[b.digest], b.t) for b in start.blocks if b.digest in sizes]
    own = own[:proffmt.MAX_CONTRIBUTION]
    meta = {k: start.meta[k] for k in ("argv", "ref") if k in start.meta}
    if workload is not None:
        meta["workload"] = proffmt.check_workload(workload)
    target = proffmt.tag_for(image_digest, workload)
    if not own:  # nothing of this image: the store's profile stays as it is
        return {"profile": None, "blocks": None, "accepted": 0, "dropped": len(start.blocks),
                "starts": None}
    try:
        old = proffmt.decode(objects.read_manifest_bytes(store, store.get_tag(*target)))
        if old.image != image_digest:
            old = None
    except NotFound:
        old = None
    except LazyfsError as exc:  # a broken profile is replaced, not kept forever
        log.warning("replacing the unreadable profile %s:%s: %s", *target, exc)
        old = None
    merged = proffmt.merge(old, Profile(image_digest, tuple(own), meta))
    digest = objects.put_record(store, proffmt.encode(merged))
    store.put_tag(*target, digest)
    return {"profile": digest, "blocks": len(merged.blocks), "accepted": len(own),
            "dropped": len(start.blocks) - len(own), "starts": merged.meta["starts"]}


class Recorder:
    """The blocks a mount's workload touched, each once, in first-touch order, timed from the
    first read; at most MAX_CONTRIBUTION of them. ``touched`` is on the read path: a dict lookup
    for a block seen before, a lock only for a new one."""

    def __init__(self, limit: int = proffmt.MAX_CONTRIBUTION):
        self.limit = limit
        self.first: float | None = None
        self.last_new = 0.0  # monotonic time of the latest first touch
        self._seen: dict[str, ProfileBlock] = {}
        self._guessed: dict[str, ProfileBlock] = {}  # fetched ahead on a guess, not (yet) seen read
        self._lock = threading.Lock()

    def touched(self, digest: str, size: int, guess: bool = False) -> None:
        """A read of the block (``guess``: a fetch ahead of any read, such as a directory's
        siblings: it counts only if it turns out to have been read, see profile())."""
        if digest in self._seen or (guess and digest in self._guessed):
            return
        with self._lock:
            # Read under the lock: a clock read before it could be older than the first touch
            # of a thread that took the lock in between, and a time before the first is < 0.
            now = time.monotonic()
            if digest in self._seen:
                return
            promoted = not guess and self._guessed.pop(digest, None) is not None  # takes no room
            if not promoted and len(self._seen) + len(self._guessed) >= self.limit:
                return
            if self.first is None:
                self.first = now
            block = ProfileBlock(digest, size, now - self.first)
            if guess:
                self._guessed.setdefault(digest, block)
            else:
                self._seen[digest] = block
            self.last_new = now

    def __len__(self) -> int:
        return len(self._seen) + len(self._guessed)

    def profile(self, image_digest: str, skip: frozenset = frozenset(), meta: dict | None = None,
                was_read=lambda digest: True) -> Profile:
        """What was recorded, in first-touch order, less ``skip`` (the blocks of the profile the
        mount prefetched: a contribution of a start that had a profile is what that profile
        missed). A guessed block counts, at the time it was fetched, where ``was_read(digest)``
        says something read it after all (the kernel, from the node cache, where the daemon
        cannot see it)."""
        with self._lock:
            seen, guessed = list(self._seen.values()), list(self._guessed.values())
        kept = [b for b in guessed if was_read(b.digest)]
        blocks = sorted(seen + kept, key=lambda b: b.t)
        return Profile(image_digest, tuple(b for b in blocks if b.digest not in skip), dict(meta or {}))

    @property
    def guessed(self) -> int:
        return len(self._guessed)

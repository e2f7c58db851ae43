"""Startup profiles in a store: record one from a mount's read trace, publish it, find it at mount.

The codec is lazyfs.format.profile; this module does the reading and writing around it.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable

from lazyfs.errors import LazyfsError, NotFound
from lazyfs.format import block, digest as digests, kinds
from lazyfs.format import profile as proffmt, trace as tracefmt
from lazyfs.format.manifest import EntryType, Manifest
from lazyfs.format.profile import Profile, ProfileBlock
from lazyfs.fs.index import ImageIndex
from lazyfs.store import objects
from lazyfs.store.base import BlockStore

log = logging.getLogger("lazyfs.profile")
AUTO, NONE = "auto", "none"


def parse_trace(lines: Iterable[str]) -> list[tracefmt.Read]:
    """The reads of a `--trace` file, in time order."""
    return tracefmt.decode_all(lines)


def from_trace(index: ImageIndex, reads: list[tracefmt.Read]) -> list[ProfileBlock]:
    """The blocks the reads touched, each once, in first-touch order."""
    t0 = reads[0][0] if reads else 0.0
    seen: set[str] = set()
    out: list[ProfileBlock] = []
    for t, path, offset, size in reads:
        inode = index.lookup(path.encode("utf-8", "surrogateescape").strip(b"/"))
        if inode is None or inode.entry.type != EntryType.REG:
            continue
        for chunk, _, _ in inode.chunks_for(offset, size):
            if chunk.digest not in seen:
                seen.add(chunk.digest)
                out.append(ProfileBlock(chunk.digest, chunk.size, t - t0))
    return out


def record(manifest: Manifest, image_digest: str, trace_lines: Iterable[str], meta: dict) -> Profile:
    reads = parse_trace(trace_lines)
    blocks = from_trace(ImageIndex(manifest), reads)
    return Profile(image_digest, tuple(blocks), {"recorded": time.time(), "reads": len(reads),
                                                 "read_bytes": sum(r[3] for r in reads), **meta})


def publish(store: BlockStore, profile: Profile) -> str:
    """Store the profile and point its image's profile tag at it; returns the profile digest."""
    digest, frame = block.encode(proffmt.encode(profile), limit=objects.MAX_MANIFEST)
    store.put_manifest(digest, frame)
    store.put_tag(*proffmt.tag_for(profile.image), digest)
    return digest


def load(store: BlockStore, image_digest: str, choice: str = AUTO) -> Profile | None:
    """The profile a mount of ``image_digest`` should prefetch.

    ``choice``: "auto" (the image's own profile, if one was published), "none", a profile
    digest, or an image reference whose profile to use (say, the previous build's). With
    "auto" any problem means no prefetch and a log line; a profile the user named must exist."""
    if choice == NONE:
        return None
    try:
        if choice == AUTO:
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
    sizes = {c.digest: c.size for e in manifest.entries if e.type == EntryType.REG for c in e.chunks}
    out = [(b.digest, sizes[b.digest]) for b in profile.blocks if b.digest in sizes]
    if profile.image != image_digest:
        log.warning("startup profile was recorded on %s, not %s: %d of its %d blocks are in this "
                    "image", profile.image, image_digest, len(out), len(profile.blocks))
    return out

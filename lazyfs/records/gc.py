"""Garbage collection for stores: mark from tags, sweep the rest (node caches: lazyfs.cache.cap).

Store gc holds a "gc" lease, so it refuses to run beside a build (lazyfs/store/lease.py), and
spares anything younger than the grace period as a second line of defence. Blocks and manifests
that no tag reaches are garbage: pin an image you mount by digest with a tag.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from lazyfs.errors import LazyfsError
from lazyfs.format import kinds, manifest as mf
from lazyfs.format import snapshot as snapfmt
from lazyfs.format.manifest import EntryType
from lazyfs.records import objects
from lazyfs.store.base import BlockStore
from lazyfs.store.lease import Lease, read_leases

log = logging.getLogger("lazyfs.gc")


@dataclass
class GcReport:
    live_manifests: int = 0
    live_blocks: int = 0
    manifests: list[str] = field(default_factory=list)  # swept (or would be, on a dry run)
    blocks: list[str] = field(default_factory=list)
    bytes: int = 0
    spared_young: int = 0  # unreferenced, but younger than the grace period
    stale_leases: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict:
        return {"dry_run": self.dry_run, "live_manifests": self.live_manifests,
                "live_blocks": self.live_blocks, "swept_manifests": len(self.manifests),
                "swept_blocks": len(self.blocks), "swept_bytes": self.bytes,
                "spared_young": self.spared_young, "stale_leases_removed": self.stale_leases}


def mark(store: BlockStore, young: set[str] = frozenset()) -> tuple[set[str], set[str]]:
    """Manifests reachable from tags (images, snapshots and the images snapshots pin, startup
    profiles, provenance records), and the blocks images and snapshots reference. ``young``:
    manifests spared for their age, whose blocks must then be spared too, however old (a build
    reuses old blocks; a snapshot is stored before its tag is written)."""
    manifests: set[str] = set()
    blocks: set[str] = set()
    _walk(store, {digest for _, _, digest in store.list_tags()}, manifests, blocks)
    # What no tag reaches is kept by its age alone: one that cannot be read (a record of a
    # spelling this version refuses, one deleted since it was listed, one pinning an image gone)
    # keeps what it could be read to list, and stops no collection.
    for digest in sorted(young - manifests):
        try:
            _walk(store, {digest}, manifests, blocks)
        except LazyfsError as exc:
            log.warning("gc: %s, younger than the grace period, cannot be read (%s); kept for "
                        "its age, with what it lists that could be read", digest, exc)
    return manifests, blocks


def _walk(store: BlockStore, todo: set[str], manifests: set[str], blocks: set[str]) -> None:
    while todo:
        digest = todo.pop()
        manifests.add(digest)
        data = objects.read_manifest_bytes(store, digest)
        what = kinds.kind(data)
        if what == kinds.SNAPSHOT:
            snap = snapfmt.decode(data)
            blocks |= snap.blocks()
            if snap.image not in manifests:
                todo.add(snap.image)
            continue
        if what in (kinds.PROFILE, kinds.PROVENANCE, kinds.META):
            # A hint, not a reference: what it names lives only as long as an image tag does.
            continue
        m = mf.decode(data)
        if m.meta and m.meta not in manifests:
            todo.add(m.meta)  # the image's mount metadata lives as long as the image
        blocks.update(c.digest for e in m.entries if e.type == EntryType.REG for c in e.chunks)


def collect_store(store: BlockStore, grace: float = 3600.0, dry_run: bool = False,
                  now: float | None = None) -> GcReport:
    report = GcReport(dry_run=dry_run)
    # A dry run changes nothing, a lease included (a build beside it may make its report stale).
    with contextlib.nullcontext() if dry_run else Lease(store, "gc", conflicts=("build", "gc")) as held:
        now = now if now is not None else time.time()
        cutoff = now - grace
        listed = list(store.list_manifests())
        young = {info.digest for info in listed if info.mtime > cutoff}
        live_m, live_b = mark(store, young)
        report.live_manifests, report.live_blocks = len(live_m), len(live_b)
        # Manifests first: a block is only ever garbage once nothing that lists it survives.
        # (Young ones are spared by their age, and counted so.)
        _sweep(listed, live_m - young, cutoff, report, report.manifests,
               None if dry_run else _while_held(held, store.delete_manifest))
        _sweep(store.list_blocks(), live_b, cutoff, report, report.blocks,
               None if dry_run else _while_held(held, store.delete_block))
        for lease in read_leases(store):
            if not lease.live(now):  # its process died without letting go
                report.stale_leases += 1
                if not dry_run:
                    _while_held(held, store.delete_lease)(lease.name)
    return report


def _while_held(lease: Lease, delete: Callable[[str], None]) -> Callable[[str], None]:
    """``delete``, only while the gc's own lease has not lapsed: lapsed (its refreshes failing,
    or the machine asleep), a build may have started meanwhile and reused what it would delete."""
    def checked(name: str) -> None:
        lease.check()
        delete(name)
    return checked


def _sweep(listing, live: set[str], cutoff: float, report: GcReport, swept: list[str], delete) -> None:
    for info in listing:
        if info.digest in live:
            continue
        if info.mtime > cutoff:
            report.spared_young += 1
            continue
        swept.append(info.digest)
        report.bytes += info.size
        if delete:
            delete(info.digest)

"""containerd's snapshot semantics, as its overlay snapshotter has them, plus lazy layers.

When containerd unpacks an image it asks, layer by layer, to Prepare an active snapshot labelled
with the chain ID its result will be committed as (``containerd.io/snapshot.ref``). If the store
holds that chain's lazyfs image, the snapshotter records a committed snapshot of that name served
by the image and answers "already exists": containerd then skips the layer's download and
unpack. Otherwise it prepares an ordinary snapshot, containerd unpacks the layer into it, and the
log and the agent's counters say so (never a silent fallback).

A lazyfs-served snapshot holds its chain's whole content (not a diff on its parent), so the
directories under any snapshot are its plain ancestors down to the first lazyfs-served one,
whose shared mount ends the list. A snapshot that containerd unpacks onto such a chain (an image
lazyfs lacks sharing base layers with one it has) therefore has exactly its chain's content.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from lazyfs.errors import LazyfsError, SnapshotConflict, SnapshotExists, SnapshotInvalid
from lazyfs.format import digest as digests
from lazyfs.snapshotter import filters as filters_, overlay
from lazyfs.snapshotter.images import Images
from lazyfs.snapshotter.meta import ACTIVE, COMMITTED, VIEW, Info, MetaStore, check_labels

log = logging.getLogger("lazyfs.snapshotter")

SNAPSHOT_REF = "containerd.io/snapshot.ref"


class Snapshotter:
    def __init__(self, root: Path, images: Images | None):
        self.root = Path(root)
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.meta = MetaStore(self.root / "metadata.db")
        self.images = images

    def close(self) -> None:
        self.meta.close()

    # -- containerd's requests ------------------------------------------------------------------
    def prepare(self, key: str, parent: str, labels: dict) -> list[overlay.Mount]:
        target = labels.get(SNAPSHOT_REF, "")
        if target:
            self._serve_lazily(target, parent, labels)  # raises SnapshotExists when it does
        elif (chain := unpack_chain(key)) and self.images is not None:
            log.warning("FALLBACK: containerd unpacks layer chain %s without naming it (a client that "
                        "downloaded every layer first, as `ctr images pull` does); pull through CRI, "
                        "as Kubernetes does, for lazy layers", chain)
            self.images.report("fallback", chain)
        return self._create(key, ACTIVE, parent, labels)

    def view(self, key: str, parent: str, labels: dict) -> list[overlay.Mount]:
        return self._create(key, VIEW, parent, labels)

    def mounts(self, key: str) -> list[overlay.Mount]:
        info = self.meta.get(key)
        if info.kind == COMMITTED:
            raise SnapshotConflict(f"snapshot {key!r} is committed: only active and view snapshots mount")
        return self._mounts(info)

    def commit(self, name: str, key: str, labels: dict) -> Info:
        with self.meta.transaction():
            return self.meta.commit(key, name, labels)

    def remove(self, key: str) -> None:
        info = self.meta.get(key)
        if self.meta.children(key):
            raise SnapshotConflict(f"snapshot {key!r} has children: remove them first")
        if info.lease and self.images is not None:
            self.images.release(info.lease)  # an agent that cannot be reached fails the remove: retried
        with self.meta.transaction():
            self.meta.delete(info)
        self._remove_dir(info.id)

    def stat(self, key: str) -> Info:
        return self.meta.get(key)

    def update(self, name: str, labels: dict, paths: list[str]) -> Info:
        """Labels are the only thing that changes: ``labels`` replaces them all, ``labels.K`` one."""
        with self.meta.transaction():
            info = self.meta.get(name)
            new = dict(info.labels)
            for path in paths or ["labels"]:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    k = path[len("labels."):]
                    if k in labels:
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)
                else:
                    raise SnapshotInvalid(f"cannot update {path!r} of a snapshot (only labels)")
            return self.meta.set(info, labels=check_labels(new))

    def list(self, filters: list[str] = ()) -> Iterator[Info]:
        return (i for i in self.meta.all() if filters_.matches(i, list(filters)))

    def usage(self, key: str) -> tuple[int, int]:
        """Bytes and inodes of the snapshot's own files, as containerd's overlay snapshotter
        counts them (fs.DiskUsage of ``fs/``: each inode once, however many links it has; the
        overlay's ``work/`` not at all). A lazyfs-served snapshot has none: its content is the
        node cache's, which `lazyfs node status` reports."""
        info = self.meta.get(key)
        top = self._dir(info.id) / "fs"
        if not top.is_dir():
            return 0, 0
        seen: set[tuple[int, int]] = set()
        size = 0

        def count(path: str) -> None:
            nonlocal size
            try:
                st = os.lstat(path)
            except OSError:  # (removed meanwhile)
                return
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * 512
        count(str(top))  # (the top directory counts too, as in containerd's walk)
        for dirpath, dirs, files in os.walk(top):
            for name in dirs + files:
                count(os.path.join(dirpath, name))
        return size, len(seen)

    def cleanup(self) -> list[str]:
        """Remove directories no snapshot owns (left by a crash during a remove or prepare).
        containerd calls this beside other requests: the directories are listed before the
        rows are read, so a prepare in between (its row written, then its directory made) has
        its directory either unlisted or owned by a row that is read."""
        listed = list(os.scandir(self.root / "snapshots"))
        leases = self._agent_leases()  # (before the rows too: a lease is taken after its row)
        known = {str(i.id) for i in self.meta.all()}
        gone = []
        for entry in listed:
            if entry.name not in known:
                shutil.rmtree(entry.path, ignore_errors=True)
                gone.append(entry.name)
        # Leases the agent holds for snapshots no row names (a remove whose release failed, a
        # crash between the two): nothing else would ever hand them back.
        for target, lease in leases.items():
            if target.rpartition("#")[2] not in known:
                try:
                    self.images.release(lease)
                    log.info("cleanup handed back the lease of %s, which no snapshot holds", target)
                except LazyfsError as exc:
                    log.warning("cleanup: the lease of %s was not handed back: %s", target, exc)
        return gone

    def _agent_leases(self) -> dict[str, str]:
        if self.images is None:
            return {}
        try:
            return self.images.leases_of(f"{self.root}#")
        except LazyfsError as exc:  # (an agent away now: the next cleanup asks again)
            log.warning("cleanup: the node agent's leases cannot be read: %s", exc)
            return {}

    # -- the parts ------------------------------------------------------------------------------
    def _serve_lazily(self, target: str, parent: str, labels: dict) -> None:
        """Answer SnapshotExists if the committed snapshot ``target`` (a chain ID) on ``parent``
        exists or lazyfs can serve it. containerd then finds it by walking the snapshots for one
        labelled with ``target`` on the same parent (its metadata layer, metadata/snapshot.go)."""
        if self.find_target(target, parent) is not None:
            raise SnapshotExists(f"snapshot {target!r} already exists")
        if self.images is None or not digests.is_valid(target):
            return
        image = self.images.chain_image(target)
        if image is None:
            log.warning("FALLBACK: layer chain %s is not in the lazyfs store; containerd downloads and "
                        "unpacks it itself (build the image with `lazyfs build` to serve it lazily)", target)
            self.images.report("fallback", target)
            return
        # One committed snapshot per chain and parent: a name of its own, as containerd would
        # give one to each (two namespaces may commit the same chain on different parents).
        name = "lazyfs/%s/%s" % (hashlib.sha256(parent.encode()).hexdigest()[:12], target)
        with self.meta.transaction():
            self.meta.create(name, COMMITTED, parent, labels, image=image)
        log.info("layer chain %s served lazily by lazyfs image %s", target, image)
        self.images.report("lazy", target)
        raise SnapshotExists(f"layer chain {target} is served by lazyfs (image {image})")

    def find_target(self, target: str, parent: str) -> Info | None:
        return next((i for i in self.meta.committed_on(parent) if i.labels.get(SNAPSHOT_REF) == target),
                    None)

    def _create(self, key: str, kind: int, parent: str, labels: dict) -> list[overlay.Mount]:
        with self.meta.transaction():
            info = self.meta.create(key, kind, parent, labels)
        try:
            d = self._dir(info.id)
            (d / "fs").mkdir(parents=True, mode=0o755)
            if kind == ACTIVE:
                (d / "work").mkdir(mode=0o711)
            return self._mounts(info)
        except BaseException:
            try:  # nothing half-made: no row, no directory, no lease
                if (got := self.meta.find(key)) is not None and got.lease and self.images is not None:
                    self.images.release(got.lease)
            except LazyfsError as exc:
                log.warning("snapshot %s: its lease was not handed back: %s", key, exc)
            with self.meta.transaction():
                self.meta.delete(info)
            self._remove_dir(info.id)
            raise

    def _mounts(self, info: Info) -> list[overlay.Mount]:
        lowers = []
        for above in self.meta.ancestry(info):
            if not above.image:
                lowers.append(str(self._dir(above.id) / "fs"))
                continue
            if self.images is None:
                raise SnapshotConflict(f"snapshot {above.name!r} is served by lazyfs image {above.image}, "
                                       "but this snapshotter has no store")
            lease, mountpoint = self.images.acquire(above.image, f"{self.root}#{info.id}")
            if lease != info.lease:  # (a snapshot has one lazyfs ancestor: meta.ancestry)
                earlier = info.lease
                with self.meta.transaction():
                    info = self.meta.set(self.meta.get(info.name), lease=lease)
                if earlier:  # on a mount of other options (the snapshotter's, or the agent's
                    # cache cap, changed since): the mount it held is not this snapshot's now
                    try:
                        self.images.release(earlier)
                    except LazyfsError as exc:
                        log.warning("snapshot %s: its earlier lease %s was not handed back: %s",
                                    info.name, earlier, exc)
            lowers.append(mountpoint)
        lowers = [overlay.check_path(p) for p in lowers]
        d = self._dir(info.id)
        if info.kind == ACTIVE:
            return overlay.active(str(d / "fs"), str(d / "work"), lowers)
        return overlay.view(str(d / "fs"), lowers)

    def _dir(self, snapshot_id: int) -> Path:
        return self.root / "snapshots" / str(snapshot_id)

    def _remove_dir(self, snapshot_id: int) -> None:
        d = self._dir(snapshot_id)
        if d.exists():
            trash = d.with_name(f"rm-{snapshot_id}")  # a crash mid-delete leaves it to cleanup()
            os.rename(d, trash)
            shutil.rmtree(trash, ignore_errors=True)


_UNPACK_KEY = re.compile(r"(?:^|/)extract-\S+ (sha256:[0-9a-f]{64})\Z")


def unpack_chain(key: str) -> str | None:
    """The chain ID in the key containerd prepares a layer's unpack under ("extract-… CHAIN",
    its snapshots.UnpackKeyFormat), or None for any other key."""
    m = _UNPACK_KEY.search(key)
    return m.group(1) if m else None

"""Snapshot manifests (docs/format.md §8): what a process snapshot consists of. Pure, no I/O.

A snapshot manifest is stored like an image manifest (a zstd frame under manifests/, named by the
SHA-256 of its bytes) and tagged like one; its bytes start with MAGIC instead of the image
manifest's, followed by canonical JSON (sorted keys, no spaces). It pins the image manifest the
process ran on, and lists each file of the snapshot as blocks.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from lazyfs.errors import ManifestFormatError
from lazyfs.format import digest as digests
from lazyfs.format.block import MAX_BLOCK_SIZE
from lazyfs.format.guard import number, total, whole
from lazyfs.format.manifest import canonical_json

MAGIC = b"LZFSSNAP\x01\n"
MAX_FILES = 100_000
# Where snapshot runs keep their workspaces; a restore makes and binds the snapshot's own path
# as root, so a manifest may name nothing else.
MOUNT_ROOT = "/run/lazyfs/snap"
_MOUNT_PATH = re.compile(re.escape(MOUNT_ROOT) + r"/[0-9a-z][0-9a-z-]{0,63}")
# meta.wipe_on_fork: memory the kernel zeroes in a fork's child, which a restore zeroes in every
# copy (snapshot/wipe.py). It is a few pages in practice (glibc's and BoringSSL's generator
# states); the bounds keep a restore from writing without end.
PAGE = 4096
MAX_WIPE_RANGES = 65_536
MAX_WIPE_BYTES = 1 << 30
_USER_END = 1 << 57  # above any user-space address (x86-64 with 5-level paging: 2^56)


def _first_spelling(body) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class SnapFile:
    name: str  # relative path inside the snapshot (criu/…, upper.erofs or upper.tar, stdio)
    size: int
    chunks: tuple[tuple[str, int], ...]  # (digest, uncompressed size)


@dataclass(frozen=True)
class Snapshot:
    image: str  # the image manifest digest the process ran on
    mount_path: str  # where the container root was when dumped (restore puts it there again)
    files: tuple[SnapFile, ...]
    created: float = 0.0
    meta: dict = field(default_factory=dict)  # argv, env, workdir, criu version, timings

    def blocks(self) -> set[str]:
        return {d for f in self.files for d, _ in f.chunks}


def is_snapshot(data: bytes) -> bool:
    return data.startswith(MAGIC)


def encode(snap: Snapshot) -> bytes:
    body = {"image": snap.image, "mount_path": snap.mount_path, "created": snap.created,
            "meta": snap.meta,
            "files": [{"name": f.name, "size": f.size, "chunks": [list(c) for c in f.chunks]}
                      for f in sorted(snap.files, key=lambda f: f.name)]}
    return MAGIC + canonical_json(body)


@total("snapshot manifest", ManifestFormatError)
def decode(data: bytes) -> Snapshot:
    if not is_snapshot(data):
        raise ManifestFormatError("not a lazyfs snapshot manifest (bad magic)")
    raw = data[len(MAGIC):]
    body = json.loads(raw)
    # One snapshot, one spelling, one digest: duplicate keys, spaces, NaN or Infinity are refused.
    # (The first snapshots, 2026-11-24, escaped non-ASCII text as \uXXXX: that spelling reads too,
    # spelt out only for a manifest that is not canonical.)
    if raw != canonical_json(body) and raw != _first_spelling(body):
        raise ManifestFormatError("snapshot manifest is not canonical JSON")
    if len(body["files"]) > MAX_FILES:
        raise ManifestFormatError("snapshot lists too many files")
    files = [_file(f) for f in body["files"]]
    names = [f.name for f in files]
    if any(a >= b for a, b in zip(names, names[1:])):
        raise ManifestFormatError("snapshot files are not sorted by name, or a name repeats")
    mount_path = body["mount_path"]
    if not isinstance(mount_path, str) or not _MOUNT_PATH.fullmatch(mount_path):
        raise ManifestFormatError(f"snapshot mount_path {str(mount_path)[:100]!r} is not a "
                                  f"workspace under {MOUNT_ROOT}/")
    created, meta = body.get("created", 0.0), body.get("meta", {})
    if not number(created) or not isinstance(meta, dict):
        raise ManifestFormatError("snapshot created must be a number and meta an object")
    wipe_on_fork(meta)
    return Snapshot(digests.validate(body["image"]), mount_path, tuple(files), float(created), meta)


def _file(f: dict) -> SnapFile:
    name, size = f["name"], f["size"]
    if not isinstance(name, str) or not name or name.startswith("/") or "\0" in name or \
            any(part in ("", ".", "..") for part in name.split("/")):
        raise ManifestFormatError(f"snapshot file name {str(name)[:100]!r} is not a safe relative path")
    chunks = tuple((digests.validate(d), n) for d, n in f["chunks"])
    if not whole(size) or not all(whole(n) and 0 < n <= MAX_BLOCK_SIZE for _, n in chunks):
        raise ManifestFormatError(f"snapshot file {name!r}: sizes must be whole numbers, chunks "
                                  f"of 1 to {MAX_BLOCK_SIZE} bytes")
    if sum(n for _, n in chunks) != size:
        raise ManifestFormatError(f"snapshot file {name!r}: chunk sizes do not add up")
    return SnapFile(name, size, chunks)


def wipe_on_fork(meta: dict) -> dict[int, tuple[tuple[int, int], ...]]:
    """``meta["wipe_on_fork"]``, checked: for each process (by its PID inside the snapshot's PID
    namespace, which a restore gives back), the [start, end) ranges of its memory that a fork
    wipes. Absent (snapshots before 2026-12-07): none."""
    raw = meta.get("wipe_on_fork", {})
    if not isinstance(raw, dict):
        raise ManifestFormatError("snapshot meta wipe_on_fork must be an object")
    out, count, size = {}, 0, 0
    for pid, ranges in raw.items():
        if not (isinstance(pid, str) and pid.isascii() and pid.isdigit() and pid[0] != "0"
                and len(pid) <= 10 and isinstance(ranges, list)):
            raise ManifestFormatError(f"snapshot meta wipe_on_fork: {str(pid)[:20]!r} is not a "
                                      "PID with a list of ranges")
        spans = []
        for r in ranges:
            if not (isinstance(r, list) and len(r) == 2 and all(whole(a) and a % PAGE == 0 for a in r)
                    and 0 < r[0] < r[1] <= _USER_END):
                raise ManifestFormatError(f"snapshot meta wipe_on_fork of pid {pid}: {str(r)[:60]} "
                                          "is not a page-aligned [start, end) address range")
            spans.append((r[0], r[1]))
            count, size = count + 1, size + r[1] - r[0]
        if any(end > start for (_, end), (start, _) in zip(spans, spans[1:])):
            raise ManifestFormatError(f"snapshot meta wipe_on_fork of pid {pid}: ranges overlap "
                                      "or are not sorted")
        out[int(pid)] = tuple(spans)
    if count > MAX_WIPE_RANGES or size > MAX_WIPE_BYTES:
        raise ManifestFormatError(f"snapshot meta wipe_on_fork: {count} ranges of {size} bytes, over "
                                  f"the bounds ({MAX_WIPE_RANGES} ranges, {MAX_WIPE_BYTES} bytes)")
    return out

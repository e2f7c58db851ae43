"""Snapshot manifests (docs/format.md §8): what a process snapshot consists of. Pure, no I/O.

A snapshot manifest is stored like an image manifest (a zstd frame under manifests/, named by the
SHA-256 of its bytes) and tagged like one; its bytes start with MAGIC instead of the image
manifest's, followed by canonical JSON (sorted keys, no spaces). It pins the image manifest the
process ran on, and lists each file of the snapshot as blocks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from lazyfs.errors import ManifestFormatError
from lazyfs.format import digest as digests
from lazyfs.format.guard import total
from lazyfs.format.manifest import canonical_json

MAGIC = b"LZFSSNAP\x01\n"
MAX_FILES = 100_000


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
    body = json.loads(data[len(MAGIC):])
    files = []
    for f in body["files"]:
        chunks = tuple((digests.validate(d), int(n)) for d, n in f["chunks"])
        name = str(f["name"])
        if name.startswith("/") or ".." in name.split("/") or not name:
            raise ManifestFormatError(f"snapshot file name {name!r} is not a safe relative path")
        if sum(n for _, n in chunks) != int(f["size"]) or any(n < 0 for _, n in chunks):
            raise ManifestFormatError(f"snapshot file {name!r}: chunk sizes do not add up")
        files.append(SnapFile(name, int(f["size"]), chunks))
    if len(files) > MAX_FILES:
        raise ManifestFormatError("snapshot lists too many files")
    return Snapshot(digests.validate(body["image"]), str(body["mount_path"]), tuple(files),
                    float(body.get("created", 0.0)), dict(body.get("meta", {})))

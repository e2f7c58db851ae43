"""Startup profiles (docs/format.md §9): the blocks a workload touched first, in order. Pure, no I/O.

A profile is stored like a manifest (a zstd frame under manifests/, named by the SHA-256 of its
bytes): MAGIC, then canonical JSON. It is found through the tag ``lazyfs-profile:sha256-HEX`` of
the image manifest it was recorded on, so a rebuilt image (a new digest) never silently picks up
an old profile; a user can still name any profile explicitly (``--profile``). A profile is only a
hint: the mount fetches nothing it lists that the image does not reference, and bytes are
verified like any other block, so a wrong profile costs bandwidth, never correctness.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from lazyfs.errors import ManifestFormatError
from lazyfs.format import digest as digests
from lazyfs.format.guard import total
from lazyfs.format.manifest import canonical_json

MAGIC = b"LZFSPROF\x01\n"
TAG_NAME = "lazyfs-profile"
MAX_BLOCKS = 1_000_000


@dataclass(frozen=True)
class ProfileBlock:
    digest: str
    size: int  # uncompressed bytes
    t: float  # seconds after the mount's first read when the workload first touched it


@dataclass(frozen=True)
class Profile:
    image: str  # the image manifest digest it was recorded on
    blocks: tuple[ProfileBlock, ...]  # in first-touch order, each digest once
    meta: dict = field(default_factory=dict)  # command, bytes read, duration, when recorded

    @property
    def bytes(self) -> int:
        return sum(b.size for b in self.blocks)


def tag_for(image_digest: str) -> tuple[str, str]:
    """The (name, tag) under which the profile of an image manifest is published."""
    return TAG_NAME, "sha256-" + digests.hex_part(digests.validate(image_digest))


def is_profile(data: bytes) -> bool:
    return data.startswith(MAGIC)


def encode(profile: Profile) -> bytes:
    body = {"image": profile.image, "meta": profile.meta,
            "blocks": [[b.digest, b.size, round(b.t, 6)] for b in profile.blocks]}
    return MAGIC + canonical_json(body)


@total("startup profile", ManifestFormatError)
def decode(data: bytes) -> Profile:
    if not is_profile(data):
        raise ManifestFormatError("not a lazyfs startup profile (bad magic)")
    body = json.loads(data[len(MAGIC):])
    raw = body["blocks"]
    if not isinstance(raw, list) or len(raw) > MAX_BLOCKS:
        raise ManifestFormatError(f"a profile lists at most {MAX_BLOCKS} blocks")
    blocks, seen = [], set()
    for d, n, t in raw:
        d = digests.validate(d)
        if d in seen:
            raise ManifestFormatError(f"profile lists block {d} twice")
        if int(n) < 0 or float(t) < 0:
            raise ManifestFormatError(f"profile entry for {d} has a negative size or time")
        seen.add(d)
        blocks.append(ProfileBlock(d, int(n), float(t)))
    meta = body.get("meta", {})
    if not isinstance(meta, dict):
        raise ManifestFormatError("profile meta is not an object")
    return Profile(digests.validate(body["image"]), tuple(blocks), meta)

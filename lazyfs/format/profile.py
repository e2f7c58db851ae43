"""Startup profiles (docs/format.md §9): the blocks a workload touched first, in order. Pure, no I/O.

A profile is stored like a manifest (a zstd frame under manifests/, named by the SHA-256 of its
bytes): MAGIC, then canonical JSON. It is found through the tag ``lazyfs-profile:sha256-HEX`` of
the image manifest it was recorded on, so a rebuilt image (a new digest) never silently picks up
an old profile; a user can still name any profile explicitly (``--profile``). A profile is only a
hint: the mount fetches nothing it lists that the image does not reference, and bytes are
verified like any other block, so a wrong profile costs bandwidth, never correctness.

Profiles nodes record on their own are kept per workload (the tag carries a key of the command
line) and merged over starts (:func:`merge`): a block counts the starts that touched it, and a
merged profile is bounded, keeping the blocks most starts needed.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from lazyfs.errors import ManifestFormatError
from lazyfs.format import digest as digests
from lazyfs.format.block import MAX_BLOCK_SIZE
from lazyfs.format.guard import number, total, whole
from lazyfs.format.manifest import canonical_json

MAGIC = b"LZFSPROF\x01\n"
TAG_NAME = "lazyfs-profile"
MAX_BLOCKS = 1_000_000
MAX_COUNT = (1 << 31) - 1  # starts that touched a block, in a merged profile
MAX_T = 1e9  # seconds from a mount's start to a block's first read
# What one start may contribute, and what a merged profile keeps (docs/format.md §9).
MAX_CONTRIBUTION = 65_536
MAX_MERGED_BLOCKS = 65_536
MAX_MERGED_BYTES = 8 << 30
_WORKLOAD = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class ProfileBlock:
    digest: str
    size: int  # uncompressed bytes
    t: float  # seconds after the mount's first read when the workload first touched it (a
    # snapshot working set: after its first lazy restore's page server started)
    count: int = 1  # starts that touched it (merged profiles)


# meta["kind"] of a process snapshot's working set (snapshot.lazyrestore): ``image`` is then the
# snapshot's digest, under whose tag it is published; its image blocks are planned on the image.
WORKING_SET = "snapshot working set"


@dataclass(frozen=True)
class Profile:
    image: str  # the image manifest digest it was recorded on (see WORKING_SET)
    blocks: tuple[ProfileBlock, ...]  # in first-touch order, each digest once
    meta: dict = field(default_factory=dict)  # command, bytes read, duration, when recorded

    @property
    def bytes(self) -> int:
        return sum(b.size for b in self.blocks)


def tag_for(image_digest: str, workload: str | None = None) -> tuple[str, str]:
    """The (name, tag) under which the profile of an image manifest is published: the image's
    own, or one workload's on it (``workload``: a :func:`workload_key`)."""
    tag = "sha256-" + digests.hex_part(digests.validate(image_digest))
    return TAG_NAME, tag if workload is None else f"{tag}-{check_workload(workload)}"


def workload_key(argv: list[str]) -> str:
    """The key of a command line: 16 hex digits of the SHA-256 of its arguments as a JSON array."""
    joined = json.dumps(list(argv), ensure_ascii=False).encode("utf-8", "surrogateescape")
    return hashlib.sha256(joined).hexdigest()[:16]


def check_workload(key: str) -> str:
    if not isinstance(key, str) or not _WORKLOAD.fullmatch(key):
        raise ManifestFormatError(f"a workload key is 16 lowercase hex digits, not {str(key)[:40]!r}")
    return key


def is_profile(data: bytes) -> bool:
    return data.startswith(MAGIC)


def encode(profile: Profile) -> bytes:
    body = {"image": profile.image, "meta": profile.meta,
            "blocks": [[b.digest, b.size, round(b.t, 6)] + ([b.count] if b.count != 1 else [])
                       for b in profile.blocks]}
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
    for item in raw:
        if not isinstance(item, list) or len(item) not in (3, 4):
            raise ManifestFormatError("a profile entry is [digest, size, t] or [digest, size, t, count]")
        d, n, t = item[:3]
        count = item[3] if len(item) == 4 else 1
        d = digests.validate(d)
        if d in seen:
            raise ManifestFormatError(f"profile lists block {d} twice")
        # Whole numbers and finite times only: a merge adds and averages them, and encodes the
        # result again (an infinity or a 400-digit count would fail there, on a cache server).
        if not (whole(n) and n <= MAX_BLOCK_SIZE and whole(count) and 1 <= count <= MAX_COUNT
                and number(t) and 0 <= t <= MAX_T):
            raise ManifestFormatError(f"profile entry for {d}: size must be 0 to {MAX_BLOCK_SIZE}, "
                                      f"time 0 to {MAX_T:g} s, count 1 to {MAX_COUNT}")
        seen.add(d)
        blocks.append(ProfileBlock(d, n, float(t), count))
    meta = body.get("meta", {})
    if not isinstance(meta, dict):
        raise ManifestFormatError("profile meta is not an object")
    canonical_json(meta)  # (NaN or Infinity in it: ValueError, a format error here)
    return Profile(digests.validate(body["image"]), tuple(blocks), meta)


def merge(old: Profile | None, new: Profile, max_blocks: int = MAX_MERGED_BLOCKS,
          max_bytes: int = MAX_MERGED_BYTES) -> Profile:
    """``new`` (one start's blocks) merged into ``old``: each block of ``new`` counts once, however
    much it claims, and its time is averaged in. When the merge outgrows ``max_blocks`` or
    ``max_bytes``, the blocks fewest starts touched (then the latest) go first, so one odd or
    hostile start cannot push out what most starts need. In time order, as a profile is."""
    if old is not None and old.image != new.image:
        raise ManifestFormatError(f"cannot merge a profile of {new.image} into one of {old.image}")
    table = {b.digest: b for b in old.blocks} if old else {}
    for b in new.blocks:
        prev = table.get(b.digest)
        if prev is None:
            table[b.digest] = ProfileBlock(b.digest, b.size, b.t, 1)
        else:
            n = prev.count + 1
            table[b.digest] = ProfileBlock(b.digest, prev.size, (prev.t * prev.count + b.t) / n, n)
    kept, total = [], 0
    for b in sorted(table.values(), key=lambda b: (-b.count, b.t, b.digest)):
        if len(kept) < max_blocks and total + b.size <= max_bytes:
            kept.append(b)
            total += b.size
    kept.sort(key=lambda b: (b.t, b.digest))
    meta = dict(old.meta) if old else {}
    meta.update({k: new.meta[k] for k in ("argv", "ref", "workload") if k in new.meta})
    starts = meta.get("starts")
    meta["starts"] = (starts if isinstance(starts, int) and starts > 0 else 0) + 1
    return Profile(new.image, tuple(kept), meta)

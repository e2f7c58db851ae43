"""Digest strings: ``sha256:`` followed by 64 lowercase hex digits (docs/format.md, "Digests")."""
from __future__ import annotations

import hashlib
import re

from lazyfs.errors import FormatError

ALGORITHM = "sha256"
# fullmatch, not ^…$: "$" also matches before a final newline, and a digest names files.
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def compute(data: bytes | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_valid(digest: str) -> bool:
    return isinstance(digest, str) and _DIGEST_RE.fullmatch(digest) is not None


def validate(digest: str) -> str:
    """Return ``digest`` unchanged, or raise: digests become file names, so they are checked first."""
    if not is_valid(digest):
        raise FormatError(f"not a sha256 digest: {digest!r}")
    return digest


def hex_part(digest: str) -> str:
    return validate(digest)[len("sha256:"):]


def from_raw(raw: bytes) -> str:
    if len(raw) != 32:
        raise FormatError(f"raw sha256 must be 32 bytes, got {len(raw)}")
    return "sha256:" + raw.hex()


def to_raw(digest: str) -> bytes:
    return bytes.fromhex(hex_part(digest))

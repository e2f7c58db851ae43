"""Mount metadata records (docs/format.md §14): the EROFS metadata image of an image manifest,
built with the image and shipped beside it, so a cold node mounts without generating it. Pure,
no I/O.

A record is stored like a manifest (a zstd frame under manifests/, named by the SHA-256 of its
bytes): MAGIC, the EROFS layout version (u16, lazyfs.format.erofs.VERSION), then the EROFS image
byte for byte. The image manifest names the record by digest (§3, flag bit 0), so the chain tag
→ manifest → record pins every byte the kernel will parse: a node mounts a shipped image only
when its bytes hash to the digest the verified manifest gives, and otherwise refuses the mount.

The image inside is what lazyfs.format.erofs.encode makes of the manifest's entries, with the
volume UUID taken from the digest of the same manifest without the record's digest (``uuid_for``):
the manifest cannot name a record whose bytes depend on the manifest's own digest.
"""
from __future__ import annotations

import hashlib
import struct

from lazyfs.errors import ManifestFormatError
from lazyfs.format import erofs
from lazyfs.format.guard import total

MAGIC = b"LZFSMETA\x01\n"
_HEAD = struct.Struct("<H")


def is_metaimage(data: bytes) -> bool:
    return data.startswith(MAGIC)


def uuid_for(manifest_digest: str) -> bytes:
    """The EROFS volume UUID for the image of a manifest: the first 16 bytes of SHA-256 of its
    digest string (the same rule a node uses for the images it builds itself)."""
    return hashlib.sha256(manifest_digest.encode()).digest()[:16]


def encode(image: bytes, layout: int = erofs.VERSION) -> bytes:
    _check_image(layout, image)
    return MAGIC + _HEAD.pack(layout) + image


@total("mount metadata record", ManifestFormatError)
def decode(data: bytes) -> tuple[int, bytes]:
    """(EROFS layout version, image) of a record; ManifestFormatError for anything else. The
    image of another layout version than this node's is returned as it is: its shape is that
    version's, and the node ignores such a record (it makes its own image) rather than refuse it."""
    if not is_metaimage(data):
        raise ManifestFormatError("not a lazyfs mount metadata record (bad magic)")
    if len(data) < len(MAGIC) + _HEAD.size:
        raise ManifestFormatError("mount metadata record is truncated")
    (layout,) = _HEAD.unpack_from(data, len(MAGIC))
    image = data[len(MAGIC) + _HEAD.size:]
    _check_image(layout, image)
    return layout, image


def _check_image(layout: int, image: bytes) -> None:
    """The shape of an EROFS image as this version of lazyfs writes it: whole blocks, its magic
    in place. (Its bytes are trusted through the digest chain, not through this; this catches a
    mix-up.) Another layout version may be shaped otherwise, and is not looked at."""
    if layout != erofs.VERSION:
        return
    if len(image) < erofs.BLOCK or len(image) % erofs.BLOCK:
        raise ManifestFormatError(f"mount metadata image of {len(image)} bytes is not whole "
                                  f"{erofs.BLOCK}-byte blocks")
    if struct.unpack_from("<I", image, erofs.SUPER_OFFSET)[0] != erofs.MAGIC:
        raise ManifestFormatError("mount metadata image has no EROFS superblock")

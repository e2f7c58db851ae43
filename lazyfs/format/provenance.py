"""Provenance records (docs/format.md §13): what a lazyfs image was built from. Pure, no I/O.

A record is stored like a manifest (a zstd frame under manifests/, named by the SHA-256 of its
bytes): MAGIC, then canonical JSON. It lives beside the image, not in it, so the image manifest's
digest depends only on the tree and its runtime config: the same image read from a registry, an
OCI layout or an archive is one lazyfs image, with one record per way it was built.

Two tags find a record: ``lazyfs-provenance:sha256-HEX`` (HEX of the lazyfs image, for
``lazyfs inspect``) and ``lazyfs-built-from:sha256-HEX`` for each source digest (the image
manifest read, and the index it was chosen from), so a node asked for ``reg/app@sha256:…`` finds
what was built from it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from lazyfs.errors import ManifestFormatError
from lazyfs.format import digest as digests
from lazyfs.format.guard import total
from lazyfs.format.manifest import canonical_json

MAGIC = b"LZFSSRC\x01\n"
IMAGE_TAG, SOURCE_TAG = "lazyfs-provenance", "lazyfs-built-from"
TAG_NAMES = (IMAGE_TAG, SOURCE_TAG)
# The source fields a record may carry (strings): ImageInput.source, plus the transport.
FIELDS = ("transport", "ref", "manifest", "index", "platform")
DIGEST_FIELDS = ("manifest", "index")
MAX_TEXT = 4096


@dataclass(frozen=True)
class Provenance:
    image: str  # the lazyfs image manifest digest
    source: dict  # FIELDS → str
    meta: dict = field(default_factory=dict)  # informational: "built" (unix time)

    def source_digests(self) -> list[str]:
        return [self.source[k] for k in DIGEST_FIELDS if k in self.source]


def _tag(name: str, digest: str) -> tuple[str, str]:
    return name, "sha256-" + digests.hex_part(digests.validate(digest))


def image_tag(image_digest: str) -> tuple[str, str]:
    return _tag(IMAGE_TAG, image_digest)


def source_tag(source_digest: str) -> tuple[str, str]:
    return _tag(SOURCE_TAG, source_digest)


def is_provenance(data: bytes) -> bool:
    return data.startswith(MAGIC)


def _check_source(source) -> dict:
    if not isinstance(source, dict) or not set(source) <= set(FIELDS):
        raise ManifestFormatError(f"provenance source must be an object with keys from {FIELDS}")
    for key, value in source.items():
        if not isinstance(value, str) or not value or len(value.encode("utf-8", "surrogatepass")) > MAX_TEXT:
            raise ManifestFormatError(f"provenance source {key!r} must be a non-empty string")
        if key in DIGEST_FIELDS:
            digests.validate(value)
    return dict(source)


def encode(record: Provenance) -> bytes:
    body = {"image": digests.validate(record.image), "source": _check_source(record.source),
            "meta": record.meta}
    return MAGIC + canonical_json(body)


@total("provenance record", ManifestFormatError)
def decode(data: bytes) -> Provenance:
    if not is_provenance(data):
        raise ManifestFormatError("not a lazyfs provenance record (bad magic)")
    body = json.loads(data[len(MAGIC):])
    if canonical_json(body) != data[len(MAGIC):]:  # one record, one spelling, one digest
        raise ManifestFormatError("provenance record is not canonical JSON")
    meta = body.get("meta", {})
    if not isinstance(meta, dict):
        raise ManifestFormatError("provenance meta is not an object")
    return Provenance(digests.validate(body["image"]), _check_source(body["source"]), meta)

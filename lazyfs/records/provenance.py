"""Provenance records in a store: publish one after a build, find one by image or by source digest.

The codec is lazyfs.format.provenance; this module does the reading and writing around it.
"""
from __future__ import annotations

import time

from lazyfs.errors import NotFound
from lazyfs.format import digest as digests, kinds
from lazyfs.format import provenance as provfmt
from lazyfs.format.provenance import Provenance
from lazyfs.records import objects
from lazyfs.store.base import BlockStore


def publish(store: BlockStore, image_digest: str, source: dict) -> str:
    """Store the record, then the tags that find it (by image, then by each source digest)."""
    record = Provenance(image_digest, source, {"built": round(time.time(), 3)})
    digest = objects.put_record(store, provfmt.encode(record))
    store.put_tag(*provfmt.image_tag(image_digest), digest)
    for source_digest in record.source_digests():
        store.put_tag(*provfmt.source_tag(source_digest), digest)
    return digest


def _load(store: BlockStore, tag: tuple[str, str]) -> Provenance | None:
    try:
        data = objects.read_manifest_bytes(store, store.get_tag(*tag))
    except NotFound:
        return None
    if kinds.kind(data) != kinds.PROVENANCE:
        return None
    return provfmt.decode(data)


def of_image(store: BlockStore, image_digest: str) -> Provenance | None:
    """The latest record of how the image was built, or None (built before records, or a dir:)."""
    return _load(store, provfmt.image_tag(image_digest))


def built_from(store: BlockStore, source_digest: str) -> Provenance | None:
    """The record of a lazyfs image built from the source manifest or index ``source_digest``,
    if that image is still in the store."""
    record = _load(store, provfmt.source_tag(digests.validate(source_digest)))
    if record is None:
        return None
    try:
        store.get_manifest(record.image)  # gc sweeps an untagged image; its records stay behind
    except NotFound:
        return None
    return record

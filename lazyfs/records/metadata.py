"""Mount metadata in a store: made by the build, fetched by a cold node instead of generated.

The codec is lazyfs.format.metaimage; the image inside it is lazyfs.format.erofs's. A build
attaches one record to every image whose tree the kernel layout can hold; the manifest names it
by digest, so a node mounts a shipped EROFS image only if its bytes are the ones the verified
manifest pins (docs/security.md, "What the kernel parses"). Images built before this, and trees
the layout cannot hold, have none: the node generates the image from the manifest, as before.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from lazyfs.errors import DigestMismatch, FormatError, KernelLayoutUnsupported, MetadataRefused, NotFound
from lazyfs.format import digest as digests, erofs, kinds, manifest as mf, metaimage
from lazyfs.records import objects
from lazyfs.store.base import BlockStore

log = logging.getLogger("lazyfs.records.metadata")


def attach(store: BlockStore, manifest: mf.Manifest) -> mf.Manifest:
    """Write the mount metadata record of ``manifest`` and return the manifest naming it (or
    ``manifest`` as it is, when the kernel layout cannot hold its tree)."""
    bare = replace(manifest, meta=None)
    uuid = metaimage.uuid_for(digests.compute(mf.encode(bare)))
    try:
        image = erofs.encode(bare, uuid=uuid)
    except KernelLayoutUnsupported as exc:
        log.info("no mount metadata shipped (nodes will serve this image through FUSE): %s", exc)
        return bare
    digest = objects.put_record(store, metaimage.encode(image))
    return replace(bare, meta=digest)


def fetch(source, image_digest: str, manifest_bytes: bytes) -> bytes | None:
    """The EROFS image shipped with the (verified) manifest ``manifest_bytes``, verified against
    the digest the manifest gives; None if it ships none, or one of another layout version (the
    node then generates its own). MetadataRefused if the store's record is not the one pinned."""
    meta = mf.decode_meta(manifest_bytes)
    if meta is None:
        return None
    try:
        data = objects.read_manifest_bytes(source, meta)
        if kinds.kind(data) != kinds.META:
            raise MetadataRefused(f"mount metadata {meta} of image {image_digest} is not a metadata record")
        layout, image = metaimage.decode(data)
    except DigestMismatch as exc:
        raise MetadataRefused(f"mount metadata {meta} of image {image_digest} failed verification "
                              f"(got {exc.actual}): the store holds a damaged or tampered object; "
                              "refusing to mount it") from None
    except NotFound:
        raise MetadataRefused(f"mount metadata {meta} of image {image_digest} is missing from the "
                              "store; refusing to mount it") from None
    except FormatError as exc:
        raise MetadataRefused(f"mount metadata {meta} of image {image_digest}: {exc}; refusing to "
                              "mount it") from None
    if layout != erofs.VERSION:
        log.info("image %s ships EROFS layout v%d; this node writes v%d itself", image_digest, layout,
                 erofs.VERSION)
        return None
    return image

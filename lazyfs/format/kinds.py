"""Which kind of object a manifest digest names: an image, a startup profile, a process snapshot,
a provenance record or an image's mount metadata. All are stored as manifests and named by tags
(mount metadata by its image's manifest); their magic tells them apart."""
from __future__ import annotations

from lazyfs.errors import ManifestFormatError
from lazyfs.format import manifest, metaimage, profile, provenance, snapshot

IMAGE, PROFILE, SNAPSHOT, PROVENANCE, META = "image", "profile", "snapshot", "provenance", "meta"


def kind(data: bytes) -> str:
    """IMAGE, PROFILE, SNAPSHOT, PROVENANCE or META for a manifest's (verified) bytes; anything
    else is an error."""
    if snapshot.is_snapshot(data):
        return SNAPSHOT
    if profile.is_profile(data):
        return PROFILE
    if provenance.is_provenance(data):
        return PROVENANCE
    if metaimage.is_metaimage(data):
        return META
    if data[:len(manifest.MAGIC)] == manifest.MAGIC:
        return IMAGE
    raise ManifestFormatError("not a lazyfs image, profile, snapshot, provenance or mount metadata "
                              "manifest (bad magic)")

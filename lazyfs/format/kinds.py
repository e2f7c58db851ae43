"""Which kind of object a manifest digest names: an image, a startup profile, a process snapshot
or a provenance record. All are stored as manifests and named by tags; their magic tells them apart."""
from __future__ import annotations

from lazyfs.errors import ManifestFormatError
from lazyfs.format import manifest, profile, provenance, snapshot

IMAGE, PROFILE, SNAPSHOT, PROVENANCE = "image", "profile", "snapshot", "provenance"


def kind(data: bytes) -> str:
    """IMAGE, PROFILE, SNAPSHOT or PROVENANCE for a manifest's (verified) bytes; anything else is
    an error."""
    if snapshot.is_snapshot(data):
        return SNAPSHOT
    if profile.is_profile(data):
        return PROFILE
    if provenance.is_provenance(data):
        return PROVENANCE
    if data[:len(manifest.MAGIC)] == manifest.MAGIC:
        return IMAGE
    raise ManifestFormatError("not a lazyfs image, profile, snapshot or provenance manifest (bad magic)")

"""Which kind of object a manifest digest names: an image, a startup profile or a process
snapshot. All three are stored as manifests and named by tags; their magic tells them apart."""
from __future__ import annotations

from lazyfs.errors import ManifestFormatError
from lazyfs.format import manifest, profile, snapshot

IMAGE, PROFILE, SNAPSHOT = "image", "profile", "snapshot"


def kind(data: bytes) -> str:
    """IMAGE, PROFILE or SNAPSHOT for a manifest's (verified) bytes; anything else is an error."""
    if snapshot.is_snapshot(data):
        return SNAPSHOT
    if profile.is_profile(data):
        return PROFILE
    if data[:len(manifest.MAGIC)] == manifest.MAGIC:
        return IMAGE
    raise ManifestFormatError("not a lazyfs image, profile or snapshot manifest (bad magic)")

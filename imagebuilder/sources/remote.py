"""The ``docker://`` source: an image read straight from a registry, layer streams and all.

The registry's manifests, index and config are read whole and verified against their digests; each
layer is a :class:`~imagebuilder.sources.download.BlobReader` that read_layer hashes as it streams,
so a layer is never held whole in memory or on disk, and nothing reaches the store before the build
has verified every byte (imagebuilder/build.py stages blocks until then).
"""
from __future__ import annotations

import json

from lazyfs.errors import ImageSourceError, NotAnImage
from lazyfs.format import digest as digests
from lazyfs.format.guard import JSON_ERRORS

from imagebuilder.sources import dockerref, oci, regauth
from imagebuilder.sources.blobs import BlobSource
from imagebuilder.sources.model import ImageInput, SourceOptions
from imagebuilder.sources.download import BlobReader
from imagebuilder.sources.registry import Registry


class RegistryBlobs(BlobSource):
    """The blobs of one repository, named as in a layout (``blobs/sha256/HEX``) so oci._image reads
    them the same way."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.label = f"docker://{registry.ref.host}/{registry.ref.repo}"
        self.heads: dict[str, tuple[bool, int | None]] = {}  # digest → (found, size) from a HEAD

    @staticmethod
    def _digest(name: str) -> str:
        digest = "sha256:" + name.rpartition("/")[2]
        if not name.startswith("blobs/sha256/") or not digests.is_valid(digest):
            raise ImageSourceError(f"not a blob name: {name!r}")
        return digest

    def exists(self, name: str) -> bool:
        digest = self._digest(name)
        if digest not in self.heads:
            self.heads[digest] = self.registry.blob_head(digest)
        return self.heads[digest][0]

    def size(self, name: str) -> int | None:
        """What the registry's HEAD said (Content-Length), once exists() has asked."""
        return self.heads.get(self._digest(name), (False, None))[1]

    def open(self, name: str, size: int | None = None) -> BlobReader:
        return self.registry.blob(self._digest(name), size)


def load(spec: str, options: SourceOptions) -> ImageInput:
    ref = dockerref.parse(spec)
    label = f"docker://{ref}"
    creds = regauth.from_creds(options.creds) if options.creds else None
    registry = Registry(ref, creds, tls_verify=options.tls_verify, limits=options.limits)

    def fetch(desc: dict) -> tuple[dict, str | None, str]:
        digest = oci.descriptor_digest(label, desc)
        doc, media, _ = _manifest(registry, digest, label, oci.descriptor_size(label, desc))
        return doc, desc.get("mediaType") or media, digest

    doc, media, digest = _manifest(registry, ref.reference, label)
    manifest, digest, indexes = oci.resolve(label, doc, media, digest, fetch, options.platform)
    image = oci._image(RegistryBlobs(registry), manifest, label)
    image.source.update(ref=label, manifest=digest, **({"index": indexes[0]} if indexes else {}))
    return image


def _manifest(registry: Registry, reference: str, label: str,
              size: int | None = None) -> tuple[dict, str | None, str]:
    data, media, digest = registry.manifest(reference, size)
    try:
        doc = json.loads(data)
    except JSON_ERRORS as exc:
        raise ImageSourceError(f"{label}: manifest {reference} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise NotAnImage(f"{label}: manifest {reference} is not a JSON object")
    if doc.get("schemaVersion") == 1:
        raise ImageSourceError(f"{label}: a Docker schema 1 manifest (deprecated); push the image "
                               "again with a current docker, podman or skopeo")
    return doc, media, digest

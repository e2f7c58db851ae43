"""OCI image layouts (a directory, or the same inside an ``oci-archive`` tar)."""
from __future__ import annotations

import platform

from lazyfs.errors import ImageSourceError, NotAnImage, UnsupportedMediaType
from lazyfs.format import digest as digests

from imagebuilder.sources.blobs import BlobSource
from imagebuilder.sources.model import ImageInput, LayerRef, runtime_config

INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json"}
MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json"}
CONFIG_TYPES = {"application/vnd.oci.image.config.v1+json",
                "application/vnd.docker.container.image.v1+json"}
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
}
REF_NAME = "org.opencontainers.image.ref.name"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _descriptor_digest(label: str, desc: dict) -> str:
    digest = desc.get("digest") if isinstance(desc, dict) else None
    if not digests.is_valid(digest or ""):
        raise ImageSourceError(f"{label}: descriptor has no valid sha256 digest: {str(desc)[:120]}")
    return digest


def _pick(label: str, index: dict, tag: str | None) -> dict:
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise NotAnImage(f"{label}: index.json lists no images")
    if tag:
        found = [m for m in manifests if isinstance(m, dict)
                 and (m.get("annotations") or {}).get(REF_NAME) in (tag, )]
        found = found or [m for m in manifests if isinstance(m, dict) and
                          str((m.get("annotations") or {}).get(REF_NAME, "")).endswith(":" + tag)]
        if not found:
            names = sorted(str((m.get("annotations") or {}).get(REF_NAME)) for m in manifests
                           if isinstance(m, dict))
            raise NotAnImage(f"{label}: no image tagged {tag!r} (has: {', '.join(names)})")
        return found[0]
    if len(manifests) == 1:
        return manifests[0]
    for m in manifests:  # an index of platforms: take this machine's
        plat = m.get("platform") or {}
        if plat.get("os") == "linux" and plat.get("architecture") == _ARCH:
            return m
    raise NotAnImage(f"{label}: holds {len(manifests)} images; name one as oci:PATH:TAG")


def load(blobs: BlobSource, tag: str | None, label: str) -> ImageInput:
    if not blobs.exists("oci-layout"):
        raise NotAnImage(f"{label}: no oci-layout file (not an OCI image layout)")
    layout = blobs.read_json("oci-layout")
    if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != "1.0.0":
        raise NotAnImage(f"{label}: unsupported oci-layout version {layout!r:.80}")
    desc = _pick(label, blobs.read_json("index.json"), tag)
    for _ in range(4):  # nested indexes are legal; bound the depth
        media = desc.get("mediaType")
        digest = _descriptor_digest(label, desc)
        doc = blobs.read_json(blobs.blob_path(digest), digest)
        media = media or doc.get("mediaType")
        if media in INDEX_TYPES:
            desc = _pick(label, doc, None)
            continue
        if media not in MANIFEST_TYPES:
            raise UnsupportedMediaType(f"{label}: unsupported manifest media type {media!r}")
        return _image(blobs, doc, label)
    raise ImageSourceError(f"{label}: image indexes nested too deeply")


def _image(blobs: BlobSource, manifest: dict, label: str) -> ImageInput:
    cdesc = manifest.get("config") or {}
    if cdesc.get("mediaType") not in CONFIG_TYPES:
        raise UnsupportedMediaType(f"{label}: unsupported config media type {cdesc.get('mediaType')!r}")
    cdigest = _descriptor_digest(label, cdesc)
    config = blobs.read_json(blobs.blob_path(cdigest), cdigest)
    if not isinstance(config, dict):
        raise ImageSourceError(f"{label}: image config is not a JSON object")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise ImageSourceError(f"{label}: manifest has no layer list")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layers):
        raise ImageSourceError(f"{label}: config lists {len(diff_ids)} diff_ids for {len(layers)} layers")
    refs = []
    for desc, diff_id in zip(layers, diff_ids):
        if desc.get("mediaType") not in LAYER_TYPES:
            raise UnsupportedMediaType(f"{label}: unsupported layer media type {desc.get('mediaType')!r}")
        digest = _descriptor_digest(label, desc)
        path = blobs.blob_path(digest)
        if not blobs.exists(path):
            raise NotAnImage(f"{label}: layer blob {digest} is missing")
        refs.append(LayerRef(digest[:19], lambda p=path: blobs.open(p), digest,
                             diff_id if digests.is_valid(diff_id) else None, blobs.size(path)))
    return ImageInput(label, refs, runtime_config(config), close=blobs.close)

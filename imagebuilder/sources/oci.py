"""OCI image layouts (a directory, or the same inside an ``oci-archive`` tar)."""
from __future__ import annotations

import platform
from typing import Callable

from lazyfs.errors import ImageSourceError, NotAnImage, PlatformNotFound, UnsupportedMediaType
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


def descriptor_digest(label: str, desc: dict) -> str:
    digest = desc.get("digest") if isinstance(desc, dict) else None
    if not digests.is_valid(digest or ""):
        raise ImageSourceError(f"{label}: descriptor has no valid sha256 digest: {str(desc)[:120]}")
    return digest


def descriptor_size(label: str, desc: dict) -> int:
    """The size a descriptor declares: required (OCI image spec), and what bounds the read of
    the blob before its digest can be checked."""
    size = desc.get("size") if isinstance(desc, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageSourceError(f"{label}: descriptor has no valid size: {str(desc)[:120]}")
    return size


HOST_PLATFORM = f"linux/{_ARCH}"


def parse_platform(text: str) -> tuple[str, str, str | None]:
    """``OS/ARCH[/VARIANT]`` (``linux/amd64``, ``linux/arm64/v8``) → its parts."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise NotAnImage(f"invalid platform {text!r} (expected OS/ARCH[/VARIANT], e.g. linux/amd64)")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def platform_of(plat: dict) -> str:
    """The ``OS/ARCH[/VARIANT]`` spelling of an index entry's or config's platform fields."""
    text = f"{plat.get('os', '?')}/{plat.get('architecture', '?')}"
    return text + (f"/{plat['variant']}" if plat.get("variant") else "")


def choose_platform(label: str, manifests: list, platform: str) -> dict:
    want_os, want_arch, want_variant = parse_platform(platform)
    for m in manifests:
        plat = m.get("platform") or {}
        if plat.get("os") == want_os and plat.get("architecture") == want_arch and (
                want_variant is None or plat.get("variant", "v8" if want_arch == "arm64" else None) == want_variant):
            return m
    has = sorted({platform_of(m.get("platform") or {}) for m in manifests})
    raise PlatformNotFound(f"{label}: no image for platform {platform} (the index has: {', '.join(has)}); "
                           "choose one with --platform")


def _pick(label: str, index: dict, tag: str | None, platform: str = HOST_PLATFORM) -> dict:
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests or not all(isinstance(m, dict) for m in manifests):
        raise NotAnImage(f"{label}: the index lists no images")
    if tag:
        found = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) in (tag, )]
        found = found or [m for m in manifests
                          if str((m.get("annotations") or {}).get(REF_NAME, "")).endswith(":" + tag)]
        if not found:
            names = sorted(str((m.get("annotations") or {}).get(REF_NAME)) for m in manifests)
            raise NotAnImage(f"{label}: no image tagged {tag!r} (has: {', '.join(names)})")
        return found[0]
    if len(manifests) == 1 and not manifests[0].get("platform"):
        return manifests[0]
    if not any(m.get("platform") for m in manifests):
        raise NotAnImage(f"{label}: holds {len(manifests)} images; name one as oci:PATH:TAG")
    return choose_platform(label, manifests, platform)  # an index of platforms


Fetch = Callable[[dict], "tuple[dict, str | None, str]"]


def resolve(label: str, doc: dict, media: str | None, digest: str, fetch: Fetch,
            platform: str) -> tuple[dict, str, list[str]]:
    """Follow image indexes down to one image manifest: (manifest, its digest, the digests of the
    indexes passed on the way). ``fetch(descriptor)`` → (document, media type, digest), verified."""
    indexes = []
    for _ in range(4):  # nested indexes are legal; bound the depth
        if not isinstance(doc, dict):
            raise ImageSourceError(f"{label}: manifest {digest} is not a JSON object")
        media = media or doc.get("mediaType")
        if media in INDEX_TYPES:
            indexes.append(digest)
            doc, media, digest = fetch(_pick(label, doc, None, platform))
            continue
        if media not in MANIFEST_TYPES:
            raise UnsupportedMediaType(f"{label}: unsupported manifest media type {media!r}")
        return doc, digest, indexes
    raise ImageSourceError(f"{label}: image indexes nested too deeply")


def load(blobs: BlobSource, tag: str | None, label: str, platform: str = HOST_PLATFORM) -> ImageInput:
    if not blobs.exists("oci-layout"):
        raise NotAnImage(f"{label}: no oci-layout file (not an OCI image layout)")
    layout = blobs.read_json("oci-layout")
    if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != "1.0.0":
        raise NotAnImage(f"{label}: unsupported oci-layout version {layout!r:.80}")

    def fetch(desc: dict) -> tuple[dict, str | None, str]:
        digest = descriptor_digest(label, desc)
        size = descriptor_size(label, desc)
        return blobs.read_json(blobs.blob_path(digest), digest, size), desc.get("mediaType"), digest

    doc, media, digest = fetch(_pick(label, blobs.read_json("index.json"), tag, platform))
    manifest, digest, indexes = resolve(label, doc, media, digest, fetch, platform)
    image = _image(blobs, manifest, label)
    image.source.update(manifest=digest, **({"index": indexes[0]} if indexes else {}))
    return image


def _image(blobs: BlobSource, manifest: dict, label: str) -> ImageInput:
    cdesc = manifest.get("config") or {}
    if cdesc.get("mediaType") not in CONFIG_TYPES:
        raise UnsupportedMediaType(f"{label}: unsupported config media type {cdesc.get('mediaType')!r}")
    cdigest = descriptor_digest(label, cdesc)
    config = blobs.read_json(blobs.blob_path(cdigest), cdigest, descriptor_size(label, cdesc))
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
        digest = descriptor_digest(label, desc)
        size = descriptor_size(label, desc)
        path = blobs.blob_path(digest)
        if not blobs.exists(path):
            raise NotAnImage(f"{label}: layer blob {digest} is missing")
        blobs.check_size("layer", path, digest, size)
        refs.append(LayerRef(digest[:19], lambda p=path, n=size: blobs.open(p, n), digest,
                             diff_id if digests.is_valid(diff_id) else None, size))
    source = {"platform": platform_of(config)}
    return ImageInput(label, refs, runtime_config(config), close=blobs.close, source=source)

"""``docker save`` / ``podman save`` archives (manifest.json + config + layer tars)."""
from __future__ import annotations

import posixpath

from lazyfs.errors import ImageSourceError, NotAnImage
from lazyfs.format import digest as digests

from imagebuilder.sources.blobs import BlobSource
from imagebuilder.sources.model import ImageInput, LayerRef, runtime_config


def load(blobs: BlobSource, ref: str | None, label: str) -> ImageInput:
    manifest = blobs.read_json("manifest.json")
    if not isinstance(manifest, list) or not manifest or not all(isinstance(m, dict) for m in manifest):
        raise NotAnImage(f"{label}: manifest.json is not a docker-archive manifest list")
    if ref:
        chosen = [m for m in manifest if ref in (m.get("RepoTags") or [])
                  or any(t.endswith("/" + ref) for t in m.get("RepoTags") or [])]
        if not chosen:
            raise NotAnImage(f"{label}: no image named {ref!r}")
        entry = chosen[0]
    elif len(manifest) == 1:
        entry = manifest[0]
    else:
        raise NotAnImage(f"{label}: holds {len(manifest)} images; name one as docker-archive:PATH:NAME:TAG")
    cpath = entry.get("Config")
    if not isinstance(cpath, str):
        raise NotAnImage(f"{label}: manifest.json entry has no Config")
    # The config file is named by its digest (<hex>.json or blobs/sha256/<hex>): check it.
    stem = posixpath.basename(cpath).removesuffix(".json")
    config = blobs.read_json(cpath, "sha256:" + stem if digests.is_valid("sha256:" + stem) else None)
    if not isinstance(config, dict):
        raise ImageSourceError(f"{label}: image config is not a JSON object")
    layers = entry.get("Layers")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if not isinstance(layers, list) or len(diff_ids) != len(layers):
        raise ImageSourceError(f"{label}: {len(layers or [])} layers but {len(diff_ids)} diff_ids in config")
    refs = []
    for path, diff_id in zip(layers, diff_ids):
        if not isinstance(path, str) or not blobs.exists(path):
            raise NotAnImage(f"{label}: layer {path!r} is missing")
        if not digests.is_valid(diff_id):
            raise ImageSourceError(f"{label}: invalid diff_id {diff_id!r}")
        refs.append(LayerRef(diff_id[:19], lambda p=path: blobs.open(p), None, diff_id, blobs.size(path)))
    return ImageInput(label, refs, runtime_config(config), close=blobs.close)

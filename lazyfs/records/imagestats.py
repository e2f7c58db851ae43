"""Numbers about images in a store: what `lazyfs images` and `lazyfs inspect` print."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from lazyfs.format import chain as chainfmt, kinds, manifest as mf
from lazyfs.format.manifest import EntryType, Manifest
from lazyfs.records import objects
from lazyfs.store.base import BlockStore


@dataclass
class ImageStats:
    ref: str
    digest: str
    entries: int
    files: int
    bytes: int  # logical bytes of regular files (a hardlinked file counts once)
    blocks: int  # distinct blocks
    block_bytes: int  # uncompressed bytes of the distinct blocks
    bytes_stored: int  # encoded bytes of the distinct blocks in the store
    dedup_ratio: float  # bytes / block_bytes: > 1 when content repeats within the image
    shared_blocks: int = 0  # blocks also used by other tagged images
    shared_bytes_stored: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def logical_size(manifest: Manifest) -> int:
    """Bytes of regular files, a hardlinked file counted once."""
    return sum(e.size for e in manifest.entries if e.type == EntryType.REG)


def block_sizes(manifest: Manifest) -> dict[str, int]:
    return {c.digest: c.size for e in manifest.entries if e.type == EntryType.REG for c in e.chunks}


def image_stats(store: BlockStore, ref: str, digest: str, manifest: Manifest,
                others: dict[str, set[str]] | None = None) -> ImageStats:
    files = [e for e in manifest.entries if e.type == EntryType.REG]
    sizes = block_sizes(manifest)
    stored = {d: store.block_size(d) or 0 for d in sizes}
    logical = logical_size(manifest)
    raw = sum(sizes.values())
    shared = set()
    for other_digest, other_blocks in (others or {}).items():
        if other_digest != digest:
            shared |= sizes.keys() & other_blocks
    return ImageStats(ref, digest, len(manifest.entries), len(files), logical, len(sizes), raw,
                      sum(stored.values()), round(logical / raw, 3) if raw else 1.0,
                      len(shared), sum(stored[d] for d in shared))


def all_images(store: BlockStore) -> list[tuple[str, str, Manifest]]:
    """The images users tagged (the layer chain tags a build adds are parts of its image)."""
    cache: dict[str, Manifest] = {}
    out = []
    for name, tag, digest in store.list_tags():
        if name == chainfmt.TAG_NAME:
            continue
        if digest not in cache:
            data = objects.read_manifest_bytes(store, digest)
            if kinds.kind(data) != kinds.IMAGE:
                continue  # a process snapshot or a startup profile, not an image
            cache[digest] = mf.decode(data)
        out.append((f"{name}:{tag}", digest, cache[digest]))
    return out


def store_summary(store: BlockStore, images: list[tuple[str, str, Manifest]]) -> dict:
    """Across all tagged images: logical bytes vs what the store keeps once."""
    seen_manifests = set()
    logical = 0
    blocks: dict[str, int] = {}
    for _, digest, manifest in images:
        if digest in seen_manifests:
            continue
        seen_manifests.add(digest)
        logical += logical_size(manifest)
        blocks.update(block_sizes(manifest))
    stored = sum(store.block_size(d) or 0 for d in blocks)
    raw = sum(blocks.values())
    return {"images": len(seen_manifests), "logical_bytes": logical, "unique_block_bytes": raw,
            "bytes_stored": stored, "blocks": len(blocks),
            "dedup_ratio": round(logical / raw, 3) if raw else 1.0}

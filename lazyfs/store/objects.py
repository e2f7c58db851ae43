"""Typed reads and writes on top of a BlockStore: every byte read here is verified by digest."""
from __future__ import annotations

from lazyfs.errors import BlockFormatError, DigestMismatch, ManifestFormatError
from lazyfs.format import block, manifest as mf, reference
from lazyfs.store.base import BlockStore

MAX_MANIFEST = 256 * 1024 * 1024


def resolve(store: BlockStore, ref: str | reference.Reference) -> str:
    """The manifest digest an image reference names."""
    if isinstance(ref, str):
        ref = reference.parse(ref)
    if ref.digest:
        return ref.digest
    return store.get_tag(ref.name, ref.tag)


def read_manifest_bytes(store: BlockStore, digest: str) -> bytes:
    frame = store.get_manifest(digest)
    try:
        return block.decode(digest, frame, limit=MAX_MANIFEST)
    except DigestMismatch as exc:
        raise DigestMismatch(digest, exc.actual, what="manifest") from None
    except BlockFormatError as exc:
        raise ManifestFormatError(f"manifest {digest}: {exc}") from None


def read_manifest(store: BlockStore, digest: str) -> mf.Manifest:
    return mf.decode(read_manifest_bytes(store, digest))


def read_config(store: BlockStore, digest: str) -> dict:
    """The image config of a verified manifest, without decoding its entries."""
    return mf.decode_config(read_manifest_bytes(store, digest))


def write_manifest(store: BlockStore, manifest: mf.Manifest) -> str:
    digest, frame = block.encode(mf.encode(manifest), limit=MAX_MANIFEST)
    store.put_manifest(digest, frame)
    return digest


def fetch_block(store: BlockStore, digest: str, size: int | None = None) -> bytes:
    """Get a block and return its bytes only if they hash to ``digest``."""
    return block.decode(digest, store.get_block(digest), expected_size=size)

"""Typed reads and writes on top of a BlockStore: every byte read here is verified by digest."""
from __future__ import annotations

from lazyfs.errors import BlockFormatError, DigestMismatch, LazyfsError, ManifestFormatError
from lazyfs.format import block, kinds, manifest as mf, reference
from lazyfs.store.base import BlockStore

BLOCK, MANIFEST = "block", "manifest"  # the kinds of object a store holds


def resolve(store: BlockStore, ref: str | reference.Reference) -> str:
    """The manifest digest an image reference names."""
    if isinstance(ref, str):
        ref = reference.parse(ref)
    if ref.digest:
        return ref.digest
    return store.get_tag(ref.name, ref.tag)


def verify(kind: str, digest: str, frame: bytes, size: int | None = None) -> bytes:
    """The bytes a fetched frame holds, only if they hash to ``digest`` (and are ``size`` long):
    the one check every read path makes before a byte is handed on. ``kind``: "block" or
    "manifest" (which may be larger, and whose errors say so)."""
    if kind == BLOCK:
        return block.decode(digest, frame, expected_size=size)
    try:
        return block.decode(digest, frame, limit=mf.MAX_MANIFEST, shuffled_ok=False)
    except DigestMismatch as exc:
        raise DigestMismatch(digest, exc.actual, what="manifest") from None
    except BlockFormatError as exc:
        raise ManifestFormatError(f"manifest {digest}: {exc}") from None


def read_manifest_bytes(store, digest: str) -> bytes:
    """A manifest's verified bytes, from a BlockStore or a BlockSource. A source verifies what
    it hands out (lazyfs.source.base): its bytes are taken as they are, not decoded and hashed
    a second time (10-15 ms for a large image's mount metadata)."""
    verified = getattr(store, "verified_manifest", None)
    if verified is not None:
        return verified(digest)
    return verify(MANIFEST, digest, store.get_manifest(digest))


def read_manifest(store: BlockStore, digest: str) -> mf.Manifest:
    return mf.decode(as_image(digest, read_manifest_bytes(store, digest)))


def read_config(store: BlockStore, digest: str) -> dict:
    """The image config of a verified manifest, without decoding its entries."""
    return mf.decode_config(as_image(digest, read_manifest_bytes(store, digest)))


def as_image(digest: str, data: bytes) -> bytes:
    """An image manifest's bytes; another kind of manifest (a tag of a snapshot given where an
    image belongs) is named for what it is."""
    if not data.startswith(mf.MAGIC):
        found = kinds.kind(data)
        raise ManifestFormatError(f"{digest[:19]} is a {found} manifest, not an image's" + (
            " (restore it with lazyfs run --restore SNAP IMAGE)" if found == kinds.SNAPSHOT else ""))
    return data


def resolve_image(store: BlockStore, ref: str | reference.Reference) -> tuple[str, dict]:
    """The manifest digest ``ref`` names and its verified config: what every mount and run needs
    before it starts."""
    digest = resolve(store, ref)
    return digest, read_config(store, digest)


def put_record(store: BlockStore, data: bytes) -> str:
    """Store a manifest-kind record (a manifest, profile, provenance, metadata image, snapshot)
    under the digest of its bytes, which it returns."""
    digest, frame = block.encode(data, limit=mf.MAX_MANIFEST)
    store.put_manifest(digest, frame)
    return digest


def write_manifest(store: BlockStore, manifest: mf.Manifest) -> str:
    return put_record(store, mf.encode(manifest))


def fetch_block(store: BlockStore, digest: str, size: int | None = None) -> bytes:
    """Get a block and return its bytes only if they hash to ``digest``."""
    return verify(BLOCK, digest, store.get_block(digest), size)


def fetch_blocks(items: list[tuple[str, int]], fetch_one, get_frames, rejected):
    """Verified bytes of many blocks, in order: (digest, bytes) or (digest, the error).

    ``get_frames(digests)`` is a batch read (BlockStore.get_blocks) yielding (digest, frame or
    None). A frame that fails verification is reported to ``rejected(digest, error)`` (counted
    as a single read's would be) and never handed on; it, a block the batch lacks, and every
    block after a batch that breaks off get one more chance through ``fetch_one(digest, size)``
    (which may fail over)."""
    sizes = dict(items)
    pending = list(sizes)
    if pending:
        done: set[str] = set()
        try:
            for digest, frame in get_frames(pending):
                if frame is None or digest not in sizes:
                    continue
                try:
                    data = verify(BLOCK, digest, frame, sizes[digest])
                except LazyfsError as exc:
                    rejected(digest, exc)  # wrong bytes from here: the single fetch goes elsewhere
                    continue
                done.add(digest)
                yield digest, data
        except LazyfsError:
            pass  # the batch broke off; the rest go one by one
        pending = [d for d in pending if d not in done]
    for digest in pending:
        try:
            yield digest, fetch_one(digest, sizes[digest])
        except LazyfsError as exc:
            yield digest, exc

"""Layer chains in a store: the build tags the lazyfs image of each chain of an image's layers;
a node (the containerd snapshotter) finds the image that holds exactly a chain's content.

The chain codec is lazyfs.format.chain. A chain tag names an ordinary image manifest, so what
it names is verified, mounted and collected as any image is.
"""
from __future__ import annotations

from lazyfs.errors import WRONG_BYTES, NotFound
from lazyfs.format import chain as chainfmt
from lazyfs.records import objects
from lazyfs.store.base import BlockStore


def publish(store: BlockStore, chain_ids: list[str], images: list[str]) -> None:
    """Tag ``images[i]``, the lazyfs image of the first i+1 layers, as chain ``chain_ids[i]``,
    unless the chain's tag already names an image that can still be read.

    The first image tagged for a chain stays: a chain ID names exact content, so a later build's
    image of it (another --chunk-size, another EROFS layout version) holds the same tree under
    another digest, and containerd snapshots and running mounts name the first by its digest.
    Moved away, the tag would leave the first image to gc (only the tag reaches it), and those
    mounts to fail. A tag whose image is gone or damaged is pointed at the new one."""
    if len(chain_ids) != len(images):
        raise ValueError("one image per chain")
    for chain_id, image in zip(chain_ids, images):
        if _readable(store, chain_id) is None:
            store.put_tag(*chainfmt.tag_for(chain_id), image)


def _readable(store: BlockStore, chain_id: str) -> str | None:
    """The image the chain's tag names, if its manifest can be read whole and verified."""
    try:
        return find(store, chain_id)
    except WRONG_BYTES:
        return None


def find(source, chain_id: str) -> str | None:
    """The manifest digest of the lazyfs image holding exactly ``chain_id``'s content, or None
    if the store has none (``source``: a BlockStore or a BlockSource)."""
    try:
        digest = source.get_tag(*chainfmt.tag_for(chain_id))
        # The tag alone is not enough: a pull told the layer is there skips its download for
        # good, so the image it names must be readable now (not swept, not half-published).
        objects.read_manifest_bytes(source, digest)
    except NotFound:
        return None
    return digest

"""Layer chains: how containerd names the content of an image's first N layers. Pure, no I/O.

containerd (and every OCI runtime's snapshotter) names a snapshot of layers 1..N by its chain ID
(the OCI image spec, "Layer ChainID"): ChainID(L1) = DiffID(L1), and ChainID(L1..Ln) =
SHA256(ChainID(L1..Ln-1) + " " + DiffID(Ln)), where DiffID is the digest of a layer's
uncompressed tar. A chain ID therefore names exact content: the same layers in the same order,
whichever image or registry they came from.

`lazyfs build` stores, for each chain of an image it reads from layers, a lazyfs image of the
tree after those layers, and a tag ``lazyfs-chain:sha256-HEX`` (HEX of the chain ID) naming it.
A node asked for a chain finds the image that holds exactly its content (lazyfs.snapshotter).
"""
from __future__ import annotations

import hashlib

from lazyfs.format import digest as digests

TAG_NAME = "lazyfs-chain"
# The runtime config of a chain image that is not a whole image: a chain is content only, so two
# images sharing base layers share their chain images too (same tree, same manifest digest).
CHAIN_CONFIG: dict = {}


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain ID of each prefix of ``diff_ids`` (validated digests), in order."""
    out: list[str] = []
    for diff_id in diff_ids:
        digests.validate(diff_id)
        out.append(diff_id if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


def tag_for(chain_id: str) -> tuple[str, str]:
    """The (name, tag) under which a store names the lazyfs image of ``chain_id``."""
    return TAG_NAME, "sha256-" + digests.hex_part(digests.validate(chain_id))

"""Where the kernel finds a regular file's bytes: its data object (docs/format.md §11).

A data object is a whole file's content as one plain file, named by a 64-hex-digit id and found at
``/<id[:2]>/<id>`` in a data layer. A file of one chunk is named by that chunk's digest, so the node
cache's own block files serve it with no copy; a file of several chunks by the SHA-256 of its chunk
list, in a domain of its own so it can never name a block.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Sequence

from lazyfs.format import digest as digests
from lazyfs.format.manifest import Chunk

_DOMAIN = b"lazyfs-data-object-v1\0"
_ITEM = struct.Struct("<32sQ")


def object_id(chunks: Sequence[Chunk], decoded: bool = False) -> str:
    """The id of the object holding the concatenation of ``chunks`` (at least one).
    ``decoded``: the chunks come from a decoded manifest, whose digests are made from raw bytes
    and so well formed: a one-chunk id is not checked again (a large image's mount makes tens of
    thousands of ids as it starts)."""
    if len(chunks) == 1:
        digest = chunks[0].digest
        return digest[len("sha256:"):] if decoded else digests.hex_part(digest)
    h = hashlib.sha256(_DOMAIN)
    for c in chunks:
        h.update(_ITEM.pack(bytes.fromhex(digests.hex_part(c.digest)), c.size))
    return h.hexdigest()


def is_block(chunks: Sequence[Chunk]) -> bool:
    """Whether the object is one block as the node cache holds it (no assembly needed)."""
    return len(chunks) == 1


def relpath(oid: str) -> str:
    """The object's path below a data layer's root."""
    return f"{oid[:2]}/{oid}"

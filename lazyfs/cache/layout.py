"""The node cache's directory layout (docs/format.md §6), spelled here and nowhere else.

The kernel data path mounts BLOCKS and OBJECTS as overlayfs data-only layers, so these names are
what the kernel reads: a block's file is ``blocks/<hh>/<hex>`` and a whole multi-chunk file's is
``objects/<hh>/<id>``, both at lazyfs.format.dataobj.relpath of their object id (a one-chunk file's
id is its block's digest, which is why the block files serve it as they are).
"""
from __future__ import annotations

import os
from pathlib import Path

from lazyfs.format import dataobj, digest as digests, erofs

BLOCKS = "blocks"  # verified blocks, one file each
OBJECTS = "objects"  # whole multi-chunk files (lazyfs.cache.completer)
EROFS = "erofs"  # the EROFS metadata image of each image mounted on the kernel path
TMP = "tmp"  # writes in progress, renamed into place once durable
EVICTABLE = (BLOCKS, OBJECTS, EROFS)  # what a trim may remove (lazyfs.cache.cap)
LEDGER = "usage"  # the running total of the evictable bytes (lazyfs.cache.ledger)
LEDGER_LOCK = "usage.lock"  # trims take turns on it
TAKE_OVER_LOCK = "takeover.lock"  # kernel-path mounts take the directories over in turn (lazyfs.fs.kernel)
DROPPED = ".dropped-"  # a directory taken out of the cache for not being root's, until removed


def block_path(root: str | os.PathLike, digest: str) -> str:
    return os.path.join(root, BLOCKS, dataobj.relpath(digests.hex_part(digest)))


def blocks_dir(root: str | os.PathLike) -> Path:
    return Path(root) / BLOCKS


def objects_dir(root: str | os.PathLike) -> Path:
    return Path(root) / OBJECTS


def tmp_dir(root: str | os.PathLike) -> Path:
    return Path(root) / TMP


def ledger_path(root: str | os.PathLike) -> Path:
    return Path(root) / LEDGER


def erofs_image(root: str | os.PathLike, digest: str) -> Path:
    """The node's EROFS image of a manifest: made or fetched once per node and image, kept for
    later mounts; named with the encoder's version, so a new layout never reads an old image."""
    return Path(root) / EROFS / f"{digests.hex_part(digest)}-v{erofs.VERSION}.img"

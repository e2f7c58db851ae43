"""The BlockStore protocol every backend implements, and the counters wrappers report.

Stores move opaque, already encoded objects (zstd frames) keyed by digest; they never decode.
Verification happens in the layer that hands bytes on (lazyfs.records.objects, the node cache).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, runtime_checkable

from lazyfs.counters import Counters
from lazyfs.errors import NotFound

SMALL = 1 << 20  # the most a tag, a lease or a store's other small answers may be


@runtime_checkable
class BlockStore(Protocol):
    url: str

    def check(self, write: bool = False) -> None:
        """Raise StoreError/StoreUnavailable now if the store cannot be used (or written), so a
        long build fails before its work, not after."""

    def remove_if_unused(self) -> None:
        """Undo what check(write=True) created for a store that did not exist, if nothing was put
        in it since (a failed build leaves no trace); a no-op for stores that create nothing."""

    def has_block(self, digest: str) -> bool: ...

    def block_size(self, digest: str) -> int | None:
        """Stored (encoded) size of a block, or None when absent."""

    def get_block(self, digest: str) -> bytes:
        """The stored frame; raises BlockNotFound."""

    def get_blocks(self, wanted: list[str]) -> Iterator[tuple[str, bytes | None]]:
        """Many frames, in request order: (digest, frame), or (digest, None) for a block the
        store does not have. One round trip where the backend has a batch call (a cache
        server), else one read each (get_blocks_one_by_one). Raises if the read breaks off."""

    def put_block(self, digest: str, frame: bytes) -> bool:
        """Store a frame atomically; returns False when it was already there."""

    def put_blocks(self, items: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, bool]]:
        """Store many frames; yields (digest, newly stored) for each once it is durable. Lets a
        backend batch its flushes (local) or upload in parallel (remote)."""

    def list_blocks(self) -> Iterator[ObjectInfo]: ...

    def delete_block(self, digest: str) -> None:
        """Remove a block; absent is not an error (gc only)."""

    def get_manifest(self, digest: str) -> bytes: ...

    def put_manifest(self, digest: str, frame: bytes) -> bool: ...

    def list_manifests(self) -> Iterator[ObjectInfo]: ...

    def delete_manifest(self, digest: str) -> None: ...

    def get_tag(self, name: str, tag: str) -> str:
        """The manifest digest a tag points at; raises TagNotFound."""

    def put_tag(self, name: str, tag: str, digest: str) -> None: ...

    def list_tags(self) -> list[tuple[str, str, str]]:
        """All (name, tag, digest) triples, sorted."""

    def put_lease(self, name: str, data: bytes) -> None:
        """Create or refresh a lease (see lazyfs/store/lease.py); leases coordinate gc and builds."""

    def list_leases(self) -> list[tuple[str, bytes]]: ...

    def delete_lease(self, name: str) -> None: ...

    def close(self) -> None: ...


def get_blocks_one_by_one(store: BlockStore, wanted: list[str]) -> Iterator[tuple[str, bytes | None]]:
    """BlockStore.get_blocks for backends without a batch call."""
    for digest in wanted:
        try:
            yield digest, store.get_block(digest)
        except NotFound:
            yield digest, None


@dataclass(frozen=True)
class ObjectInfo:
    digest: str
    size: int  # stored (encoded) bytes
    mtime: float  # seconds since the epoch: when it was written or last reused by a build


@dataclass
class StoreStats(Counters):
    """Counters shared by wrappers and caches; benchmarks and tests read the same numbers."""

    block_gets: int = 0
    block_bytes: int = 0
    manifest_gets: int = 0
    manifest_bytes: int = 0
    puts: int = 0
    put_bytes: int = 0
    errors: int = 0
    wrong_bytes: int = 0  # answers that did not hash to their digest (never handed on)

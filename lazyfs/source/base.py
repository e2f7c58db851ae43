"""The BlockSource protocol: what a mount (or a restore) reads an image through."""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

from lazyfs.counters import Counters


@runtime_checkable
class BlockSource(Protocol):
    """Where a mount (or a restore) reads an image from: one store (lazyfs.source.reader.
    StoreReader) or a fleet of cache servers (lazyfs.source.fleet.Fleet). Unlike a BlockStore,
    it hands out block bytes only after they hashed to their digest, and it counts what it read
    in ``stats`` (block_gets, block_bytes, wrong_bytes, ...), which `lazyfs stats` reports."""

    url: str
    stats: Counters

    def get_tag(self, name: str, tag: str) -> str: ...

    def get_manifest(self, digest: str) -> bytes:
        """The manifest's stored frame (lazyfs.records.objects.read_manifest_bytes verifies it)."""

    def verified_manifest(self, digest: str) -> bytes:
        """A manifest-kind record's bytes, verified against ``digest``: what
        lazyfs.records.objects.read_manifest_bytes returns for a source, decoded and hashed once."""

    def fetch_block(self, digest: str, size: int | None = None) -> bytes:
        """The block's bytes, verified against ``digest`` (and ``size``); else a LazyfsError."""

    def fetch_blocks(self, items: list[tuple[str, int]]) -> Iterator[tuple[str, bytes | Exception]]:
        """Verified bytes of many (digest, size) blocks in batches where the source can: each
        digest once, with its bytes or the LazyfsError that kept them away."""

    def contribute_profile(self, image_digest: str, start, workload: str | None) -> dict:
        """Hand one start's startup profile to a cache server, which merges it into the store's
        (lazyfs.records.profiles.contribute); StoreError where the source is no cache server."""

    def close(self) -> None: ...

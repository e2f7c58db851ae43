"""Rendezvous (highest random weight) hashing: which servers own a digest, best first.

Every node ranks the same way without coordination, and removing a server moves only the keys it
owned (to each key's next-ranked server), so the rest of the fleet's caches stay warm.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

import xxhash

T = TypeVar("T")


def weight(server: str, key: str) -> int:
    return xxhash.xxh64_intdigest(f"{server}\0{key}")


def rank(servers: Sequence[T], key: str, name=str) -> list[T]:
    """``servers`` ordered by descending weight for ``key`` (``name`` gives each one's identity)."""
    return sorted(servers, key=lambda s: weight(name(s), key), reverse=True)

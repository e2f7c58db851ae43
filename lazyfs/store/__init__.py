"""Block stores: where blocks, manifests and tags live (one protocol, several backends)."""
from lazyfs.store.base import BlockStore, StoreStats
from lazyfs.store.open import open_store

__all__ = ["BlockStore", "StoreStats", "open_store"]

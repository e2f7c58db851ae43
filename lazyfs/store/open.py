"""Turn a --store argument into a BlockStore."""
from __future__ import annotations

from urllib.parse import urlparse

from lazyfs import paths
from lazyfs.errors import StoreError
from lazyfs.store.base import BlockStore
from lazyfs.store.local import LocalStore


def open_store(spec: str | None = None) -> BlockStore:
    """``None`` → $LAZYFS_STORE or the per-user store; ``file://PATH`` or a plain path → LocalStore."""
    spec = spec or paths.default_store()
    parsed = urlparse(spec)
    if parsed.scheme in ("", "file"):
        return LocalStore(parsed.path if parsed.scheme else spec)
    raise StoreError(f"unsupported store {spec!r}: use a directory path or file://PATH")

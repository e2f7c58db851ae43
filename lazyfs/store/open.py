"""Turn a --store argument into a BlockStore."""
from __future__ import annotations

import os
import re
from urllib.parse import urlparse

from lazyfs import paths
from lazyfs.errors import StoreError
from lazyfs.store.base import BlockStore
from lazyfs.store.local import LocalStore


def open_store(spec: str | None = None, token: str | None = None) -> BlockStore:
    """``None`` → $LAZYFS_STORE or the per-user store; a plain path or ``file://PATH`` → LocalStore;
    ``s3://BUCKET/PREFIX`` → S3Store; ``http(s)://HOST:PORT`` → a lazyfs cache server (``token``
    or $LAZYFS_TOKEN authorises writes)."""
    spec = spec or paths.default_store()
    if re.fullmatch(r"[\w.-]+:\d+", spec) and not os.path.exists(spec):
        raise StoreError(f"store {spec!r} is neither a directory nor a URL: a cache server is "
                         f"http://{spec}")
    parsed = urlparse(spec)
    if parsed.scheme in ("", "file"):
        store = LocalStore(parsed.path if parsed.scheme else spec)
        store.check()  # (a file there: refused before anything reads from it)
        return store
    if parsed.scheme == "s3":
        from lazyfs.store.s3 import S3Store
        return S3Store(spec)
    if parsed.scheme in ("http", "https"):
        from lazyfs.store.http import HttpStore
        return HttpStore(spec, token=token if token is not None else paths.default_token())
    raise StoreError(f"unsupported store {spec!r}: use a directory, file://PATH, s3://BUCKET/PREFIX "
                     "or http://CACHE-SERVER:PORT")

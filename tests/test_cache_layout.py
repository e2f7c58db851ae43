"""The kernel data path finds a one-chunk file's bytes at its data object's path in the node
cache's block layer (lazyfs.format.dataobj); the node cache writes blocks at its own path
(lazyfs.cache.layout). They must be the same file."""
from __future__ import annotations

import hashlib
import os

from hypothesis import given, strategies as st

from lazyfs.cache import layout
from lazyfs.cache.nodecache import NodeCache
from lazyfs.format import dataobj
from lazyfs.format.manifest import Chunk

chunks = st.builds(Chunk, st.binary(max_size=16).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest()),
                   st.integers(1, 1 << 19))


@given(chunks)
def test_a_block_file_is_the_data_object_of_its_one_chunk_file(chunk):
    root = "/var/cache/lazyfs"
    assert dataobj.is_block([chunk])
    expected = os.path.join(str(layout.blocks_dir(root)), dataobj.relpath(dataobj.object_id([chunk])))
    assert layout.block_path(root, chunk.digest) == expected


def test_the_node_cache_writes_where_the_layout_says(tmp_path):
    cache = NodeCache(tmp_path, lambda d, n: b"")
    digest = "sha256:" + "ab" * 32
    assert cache.path(digest) == layout.block_path(tmp_path, digest) == str(tmp_path / "blocks" / "ab" / ("ab" * 32))
    assert layout.blocks_dir(tmp_path).is_dir() and layout.tmp_dir(tmp_path).is_dir()
    cache.close()

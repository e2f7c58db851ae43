"""The layer reader on arbitrary bytes: an image or a typed error, never another exception."""
from __future__ import annotations

import gzip
import io

from hypothesis import HealthCheck, given, settings, strategies as st

from imagebuilder.ociwriter import TarEntry, make_tar
from imagebuilder.tarlayer import read_layer
from imagebuilder.tree import Tree
from lazyfs.errors import LazyfsError

VALID = make_tar([TarEntry("etc/", type=b"5", mode=0o755), TarEntry("etc/a", b"hello" * 50),
                  TarEntry("etc/l", type=b"2", linkname="a"), TarEntry("etc/h", type=b"1", linkname="etc/a")])


def _consume(raw: bytes) -> None:
    tree = Tree()

    def on_entry(entry, stream):
        if stream is not None:
            left = entry.size
            while left:
                data = stream.read(min(left, 65536))
                if not data:
                    break
                left -= len(data)
        tree.apply(0, "fuzz", entry)
    try:
        read_layer("fuzz", io.BytesIO(raw), None, None, on_entry)
    except LazyfsError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=3000))
def test_random_bytes(data):
    _consume(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data(), st.booleans())
def test_mutated_valid_layers(data, compress):
    raw = bytearray(gzip.compress(VALID) if compress else VALID)
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    _consume(bytes(raw[: data.draw(st.integers(0, len(raw)))]))

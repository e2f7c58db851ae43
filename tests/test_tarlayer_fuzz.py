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


def _pax(name: str, headers: dict, kind=None) -> bytes:
    import tarfile
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.pax_headers = headers
        if kind is not None:
            info.type = kind
        tf.addfile(info, io.BytesIO(b""))
    return out.getvalue()


def test_a_sparse_file_counts_its_holes_against_the_size_limit():
    """A sparse entry's holes read as zeroes the stream never carries: a 10 KiB tar declaring a
    1 TiB file is a decompression bomb, refused by --max-size as an inflated one is."""
    import pytest
    from lazyfs.errors import LimitExceeded
    bomb = _pax("big", {"GNU.sparse.map": "0,0", "GNU.sparse.size": str(1 << 40), "GNU.sparse.name": "big"})
    assert len(bomb) <= 10 << 10
    with pytest.raises(LimitExceeded, match="sparse file of 1099511627776 bytes"):
        read_layer("l", io.BytesIO(bomb), None, None, lambda e, s: s and s.read(1 << 20), max_bytes=1 << 30)


def test_what_the_manifest_cannot_hold_is_refused_while_the_layer_streams():
    """Numbers and xattrs a tar may carry but a manifest cannot (a uid past 32 bits, a device
    number past 32 bits, an empty xattr name): a typed error for that entry, before any block is
    stored, not a crash when the manifest is encoded at the end."""
    import tarfile
    import pytest
    from lazyfs.errors import UnsafeEntry
    for tar, why in [(_pax("f", {"uid": str(1 << 32)}), "uid 4294967296 is out of range"),
                     (_pax("f", {"gid": "-1"}), "gid -1 is out of range"),
                     (_pax("f", {"SCHILY.xattr.": "x"}), "xattr b''"),
                     (_pax("f", {"SCHILY.xattr.user.big": "x" * (70 << 10)}), "value over")]:
        with pytest.raises(UnsafeEntry, match=why):
            read_layer("l", io.BytesIO(tar), None, None, lambda e, s: s and s.read())
    info = tarfile.TarInfo("dev")
    info.type, info.devmajor = tarfile.CHRTYPE, 1 << 33
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(info)
    with pytest.raises(UnsafeEntry, match="devmajor 8589934592 is out of range"):
        read_layer("l", io.BytesIO(out.getvalue()), None, None, lambda e, s: s and s.read())


def test_a_sparse_files_data_counts_once_against_the_size_limit(tmp_path):
    """A real sparse file (GNU tar --sparse): its data is in the stream, its holes are not; the
    limit counts each once, so 6 MiB of data and a 2 MiB hole fit in 10 MiB."""
    import os
    import shutil
    import subprocess
    import pytest
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(6 << 20)
    with open(src / "sparse", "wb") as f:
        f.write(data)
        f.truncate(8 << 20)  # a 2 MiB hole at the end
    tar = tmp_path / "layer.tar"
    subprocess.run(["tar", "--sparse", "--format=posix", "-cf", str(tar), "-C", str(src), "sparse"], check=True)
    got = {}

    def on_entry(entry, stream):
        got[entry.path] = stream.read(entry.size) if stream is not None else None

    with open(tar, "rb") as raw:
        size = read_layer("l", raw, None, None, on_entry, max_bytes=10 << 20)
    assert got[b"sparse"] == data + bytes(2 << 20)
    assert (8 << 20) <= size < (8 << 20) + (64 << 10)  # what it expands to, once

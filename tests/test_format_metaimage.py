"""Mount metadata records (lazyfs.format.metaimage) and the manifest field that names one: pure
codecs, round trips, golden bytes and refusals."""
from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, strategies as st

from lazyfs.errors import FormatError, ManifestFormatError
from lazyfs.format import digest as digests, erofs, kinds, manifest as mf, metaimage
from lazyfs.records import metadata, objects
from lazyfs.store.local import LocalStore

ROOT = mf.Entry(b"", mf.EntryType.DIR, 0o755)
IMAGE = erofs.encode(mf.Manifest((ROOT,)))


def test_record_round_trip_and_kind():
    data = metaimage.encode(IMAGE)
    assert data[:len(metaimage.MAGIC)] == b"LZFSMETA\x01\n"
    assert data[len(metaimage.MAGIC):len(metaimage.MAGIC) + 2] == erofs.VERSION.to_bytes(2, "little")
    assert metaimage.decode(data) == (erofs.VERSION, IMAGE)
    assert kinds.kind(data) == kinds.META


@pytest.mark.parametrize("bad, why", [
    (b"LZFSMANI" + bytes(4106), "bad magic"),
    (metaimage.MAGIC + b"\x01", "truncated"),
    (metaimage.MAGIC + b"\x01\x00" + IMAGE[:-1], "whole"),
    (metaimage.MAGIC + b"\x01\x00" + bytes(4096), "superblock"),
])
def test_malformed_records_are_refused(bad, why):
    with pytest.raises(ManifestFormatError, match=why):
        metaimage.decode(bad)


@given(st.binary(max_size=5000))
def test_decode_is_total(data):
    try:
        metaimage.decode(metaimage.MAGIC + b"\x01\x00" + data)
    except FormatError:
        pass


def test_uuid_rule_is_the_nodes():
    digest = "sha256:" + "ab" * 32
    assert metaimage.uuid_for(digest) == hashlib.sha256(digest.encode()).digest()[:16]


def test_manifest_names_its_record_behind_flag_bit_0():
    meta = "sha256:" + "cd" * 32
    bare = mf.Manifest((ROOT,), {"Cmd": ["sh"]}, 4096)
    named = mf.Manifest((ROOT,), {"Cmd": ["sh"]}, 4096, meta)
    raw_bare, raw_named = mf.encode(bare), mf.encode(named)
    assert raw_bare[10:12] == b"\x00\x00" and raw_named[10:12] == b"\x01\x00"
    # The field is the raw digest right after the config section; nothing else moves.
    config_end = 24 + int.from_bytes(raw_bare[20:24], "little")
    assert raw_named[:10] == raw_bare[:10] and raw_named[12:config_end] == raw_bare[12:config_end]
    assert raw_named[config_end:config_end + 32] == bytes.fromhex("cd" * 32)
    assert raw_named[config_end + 32:] == raw_bare[config_end:]
    assert mf.decode(raw_named) == named and mf.decode(raw_bare) == bare
    assert mf.decode_meta(raw_named) == meta and mf.decode_meta(raw_bare) is None
    assert mf.decode_config(raw_named) == {"Cmd": ["sh"]}


def test_unknown_manifest_flags_are_still_refused():
    raw = bytearray(mf.encode(mf.Manifest((ROOT,))))
    raw[10:12] = b"\x02\x00"
    with pytest.raises(ManifestFormatError, match="unknown manifest flags"):
        mf.decode(bytes(raw))
    raw[10:12] = b"\x01\x00"  # says it names a record, then ends
    with pytest.raises(ManifestFormatError):
        mf.decode_meta(bytes(raw[:24 + 2]))


@pytest.mark.parametrize("image", [bytes(512), b"", IMAGE[:-1]], ids=["short", "empty", "part-block"])
def test_a_record_of_another_layout_version_is_ignored_whatever_its_image(image, tmp_path):
    """Only this node's layout version is held to this version's shape: a record of another
    version is ignored (the node makes its own image), not taken for a tampered one."""
    other = erofs.VERSION + 1
    record = metaimage.MAGIC + other.to_bytes(2, "little") + image
    assert metaimage.decode(record) == (other, image)
    assert metaimage.decode(metaimage.encode(image, layout=other)) == (other, image)
    with pytest.raises(ManifestFormatError, match="whole|superblock"):
        metaimage.decode(metaimage.MAGIC + erofs.VERSION.to_bytes(2, "little") + image)
    store = LocalStore(tmp_path / "store")
    meta = objects.put_record(store, record)
    manifest = mf.encode(mf.Manifest((ROOT,), meta=meta))
    assert metadata.fetch(store, digests.compute(manifest), manifest) is None

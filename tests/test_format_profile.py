"""Startup profiles: round trip, canonical bytes, garbage gives a typed error, the tag rule."""
from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings, strategies as st

from lazyfs.errors import FormatError
from lazyfs.format import profile as proffmt
from lazyfs.format import reference

digests = st.binary(min_size=1, max_size=8).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest())
blocks = st.lists(st.tuples(digests, st.integers(0, 1 << 24), st.floats(0, 1e4)), max_size=20,
                  unique_by=lambda b: b[0]).map(lambda bs: tuple(proffmt.ProfileBlock(*b) for b in bs))
profiles = st.builds(proffmt.Profile, digests, blocks, st.just({"argv": ["python3", "-c", "1"]}))


@given(profiles)
def test_round_trip_and_canonical(prof):
    data = proffmt.encode(prof)
    back = proffmt.decode(data)
    assert proffmt.encode(back) == data
    assert [b.digest for b in back.blocks] == [b.digest for b in prof.blocks]
    assert back.bytes == prof.bytes and back.image == prof.image


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_garbage_is_a_typed_error(data):
    for candidate in (data, proffmt.MAGIC + data):
        try:
            proffmt.decode(candidate)
        except FormatError:
            pass


def test_duplicates_negative_sizes_and_bad_digests_are_refused():
    d = "sha256:" + "b" * 64
    good = proffmt.encode(proffmt.Profile("sha256:" + "a" * 64, (proffmt.ProfileBlock(d, 5, 0.5),)))
    assert proffmt.decode(good).blocks[0].size == 5
    for bad in (good.replace(b',5,', b',-5,'), good.replace(b'"blocks":[', b'"blocks":[["' + d.encode() + b'",1,0],'),
                good.replace(b"b" * 64, b"B" * 64), good.replace(b'"image"', b'"imagE"')):
        with pytest.raises(FormatError):
            proffmt.decode(bad)


def test_profile_tag_is_a_valid_reference_keyed_by_image_digest():
    name, tag = proffmt.tag_for("sha256:" + "c" * 64)
    ref = reference.parse(f"{name}:{tag}")
    assert (ref.name, ref.tag) == (name, "sha256-" + "c" * 64)
    with pytest.raises(FormatError):
        proffmt.tag_for("sha256:short")

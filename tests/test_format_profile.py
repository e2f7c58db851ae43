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
                good.replace(b"b" * 64, b"B" * 64), good.replace(b'"image"', b'"imagE"'),
                # what a merge could not add, average or encode again
                good.replace(b',0.5]', b',1e999]'), good.replace(b',0.5]', b',0.5,' + b"9" * 400 + b']'),
                good.replace(b',5,', b',true,'), good.replace(b',5,', b',1.9,'), good.replace(b',0.5]', b',"2"]'),
                good.replace(b',0.5]', b',0.5,0]'), good.replace(b',5,', b',%d,' % (1 + (16 << 20))),
                good.replace(b'"meta":{}', b'"meta":{"x":NaN}')):
        with pytest.raises(FormatError):
            proffmt.decode(bad)


def test_profile_tag_is_a_valid_reference_keyed_by_image_digest():
    name, tag = proffmt.tag_for("sha256:" + "c" * 64)
    ref = reference.parse(f"{name}:{tag}")
    assert (ref.name, ref.tag) == (name, "sha256-" + "c" * 64)
    with pytest.raises(FormatError):
        proffmt.tag_for("sha256:short")


contributions = st.builds(proffmt.Profile, st.just("sha256:" + "d" * 64), blocks, st.just({}))


@given(st.lists(contributions, min_size=1, max_size=6), st.integers(1, 30), st.integers(0, 1 << 26))
def test_merge_is_bounded_counted_and_in_time_order(starts, max_blocks, max_bytes):
    merged = None
    for c in starts:
        merged = proffmt.merge(merged, c, max_blocks=max_blocks, max_bytes=max_bytes)
    assert len(merged.blocks) <= max_blocks and merged.bytes <= max_bytes
    assert merged.meta["starts"] == len(starts)
    assert [b.t for b in merged.blocks] == sorted(b.t for b in merged.blocks)
    touched, sizes = {}, {}
    for c in starts:
        for b in c.blocks:
            touched[b.digest] = touched.get(b.digest, 0) + 1
            sizes.setdefault(b.digest, b.size)
    assert all(b.count <= touched[b.digest] for b in merged.blocks)
    if len(touched) <= max_blocks and sum(sizes.values()) <= max_bytes:  # the cap never bit
        assert {b.digest: b.count for b in merged.blocks} == touched
    assert proffmt.encode(proffmt.decode(proffmt.encode(merged))) == proffmt.encode(merged)


@given(contributions)
def test_one_start_merged_into_nothing_is_that_start(prof):
    merged = proffmt.merge(None, prof)
    assert sorted(b.digest for b in merged.blocks) == sorted(b.digest for b in prof.blocks)
    assert all(b.count == 1 for b in merged.blocks)


def test_a_contribution_cannot_claim_weight_and_the_common_blocks_survive_the_cap():
    image = "sha256:" + "e" * 64
    d = lambda i: "sha256:" + hashlib.sha256(bytes([i])).hexdigest()  # noqa: E731
    common = tuple(proffmt.ProfileBlock(d(i), 100, i / 10) for i in range(5))
    merged = None
    for _ in range(3):
        merged = proffmt.merge(merged, proffmt.Profile(image, common), max_blocks=8)
    hostile = proffmt.Profile(image, tuple(proffmt.ProfileBlock(d(100 + i), 1, 0.0, 10**9)
                                           for i in range(50)))
    merged = proffmt.merge(merged, hostile, max_blocks=8)
    counts = {b.digest: b.count for b in merged.blocks}
    assert all(counts[b.digest] == 3 for b in common)  # kept, with their own counts
    assert len(merged.blocks) == 8 and max(counts.values()) == 3
    with pytest.raises(FormatError):
        proffmt.merge(merged, proffmt.Profile("sha256:" + "f" * 64, common))


def test_workload_keys_and_their_tags():
    key = proffmt.workload_key(["python3", "-c", "import torch"])
    assert len(key) == 16 and key != proffmt.workload_key(["python3", "-c", "import  torch"])
    assert proffmt.workload_key(["a", "b"]) != proffmt.workload_key(["a\0b"])
    name, tag = proffmt.tag_for("sha256:" + "c" * 64, key)
    assert reference.parse(f"{name}:{tag}").tag == f"sha256-{'c' * 64}-{key}"
    for bad in ("ABCDEF0123456789", "short", "../../etc/passwd", 7):
        with pytest.raises(FormatError):
            proffmt.tag_for("sha256:" + "c" * 64, bad)


@pytest.mark.parametrize("text", ["app:v1\n", "app\n:v1", "app\n", "app:v1\n\n"])
def test_a_final_newline_is_not_part_of_a_valid_name_or_tag(text):
    # Names and tags become store paths: "$" in a pattern would let "v1\n" through.
    with pytest.raises(FormatError):
        reference.parse(text)

"""Block codec: round trip, digest check, bombs and garbage give typed errors."""
from __future__ import annotations

import hashlib

import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from lazyfs.errors import BlockFormatError, DigestMismatch, FormatError
from lazyfs.format import block, digest as digests, shuffle


@given(st.binary(max_size=70_000), st.integers(1, 9))
def test_round_trip(data, level):
    digest, frame = block.encode(data, level)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert block.decode(digest, frame) == data


def test_golden_empty_block():
    digest, frame = block.encode(b"")
    assert digest == "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert block.decode(digest, frame) == b""


def test_wrong_digest_is_rejected():
    digest, frame = block.encode(b"good bytes")
    other = digests.compute(b"other")
    with pytest.raises(DigestMismatch) as exc:
        block.decode(other, frame)
    assert exc.value.digest == other and exc.value.actual == digest


def test_bomb_is_rejected_before_inflating():
    frame = zstandard.ZstdCompressor().compress(b"\0" * (block.MAX_BLOCK_SIZE + 1))
    with pytest.raises(BlockFormatError, match="more than"):
        block.decode(digests.compute(b"x"), frame)


def test_frame_without_content_size_is_rejected():
    frame = zstandard.ZstdCompressor(write_content_size=False).compressobj().compress(b"abc")
    frame += zstandard.ZstdCompressor(write_content_size=False).compressobj().flush()
    with pytest.raises(BlockFormatError):
        block.decode(digests.compute(b"abc"), frame)


def test_expected_size_mismatch():
    digest, frame = block.encode(b"abcdef")
    with pytest.raises(BlockFormatError, match="expected 5"):
        block.decode(digest, frame, expected_size=5)


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_garbage_frames_are_typed(data):
    try:
        block.decode(digests.compute(b"x"), data)
    except FormatError:
        pass
    except DigestMismatch:
        pass


def _shuffled_frame(data: bytes) -> bytes:
    """A block stored shuffled whatever its content (encode keeps it only where it is smaller)."""
    body = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(shuffle.shuffle(data)))
    return block.SHUFFLED + body


@given(st.binary(min_size=1, max_size=5000), st.data(), st.booleans())
def test_flipped_frames_never_decode_to_wrong_bytes(data, draw, shuffled):
    digest, frame = block.encode(data)
    if shuffled:
        frame = _shuffled_frame(data)
    raw = bytearray(frame)
    pos = draw.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= draw.draw(st.integers(1, 255))
    try:
        out = block.decode(digest, bytes(raw))
    except (FormatError, DigestMismatch):
        return
    assert out == data  # a flip zstd can absorb (e.g. in padding) must still give the right bytes


@pytest.mark.parametrize("bad", ["sha256:XYZ", "md5:" + "0" * 32, "sha256:" + "A" * 64, "../x",
                                 "sha256:" + "0" * 64 + "\n"])
def test_invalid_digest_strings(bad):
    with pytest.raises(FormatError):
        digests.validate(bad)


# Shuffled blocks (docs/format.md §2.1)

@given(st.binary(max_size=70_000), st.sampled_from([1, 3, 6]))
def test_round_trip_with_the_shuffle_tried(data, level):
    digest, frame = block.encode(data, level, shuffle=True)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert block.decode(digest, frame) == data
    assert block.declared_size(frame) == len(data)


@given(st.binary(max_size=20_000))
def test_any_block_stored_shuffled_decodes(data):
    # Any length, a multiple of 4 or not: the tail after the whole elements stays in place.
    frame = _shuffled_frame(data)
    assert block.decode(digests.compute(data), frame) == data
    assert block.declared_size(frame) == len(data)


@given(st.binary(max_size=5000), st.integers(1, 9))
def test_unshuffle_inverts_shuffle(data, width):
    shuffled = shuffle.shuffle(data, width)
    assert sorted(shuffled) == sorted(data)
    assert shuffle.shuffle(memoryview(data), width) == shuffle.shuffle(bytearray(data), width) == shuffled
    assert bytes(shuffle.unshuffle(shuffled, width)) == data


def test_shuffle_golden():
    # Two 4-byte elements and one byte after them: byte j of each element together, the tail kept.
    assert shuffle.shuffle(bytes.fromhex("000102031011121320")) == bytes.fromhex("001001110212031320")


def test_golden_shuffled_block():
    # SHUFFLED, then one zstd frame (a raw block) of the shuffled bytes.
    frame = bytes.fromhex("5c2a4d18040000005348460428b52ffd2009490000001001110212031320")
    data = bytes.fromhex("000102031011121320")
    assert block.decode("sha256:f203a38309ec2cb761cd85e21d2ac7dffb892ce4a372bf9d56b6cc52bf0a5a5d",
                        frame) == data
    assert block.declared_size(frame) == 9


def test_floats_are_stored_shuffled_and_smaller():
    import random
    import struct
    rng = random.Random(7)
    data = struct.pack("<65536f", *(rng.uniform(-0.03, 0.03) for _ in range(65536)))
    plain = block.encode(data, 3)[1]
    digest, frame = block.encode(data, 3, shuffle=True)
    assert frame.startswith(block.SHUFFLED) and len(frame) < 0.95 * len(plain)
    assert block.decode(digest, frame) == data


def test_noise_and_text_are_stored_plain():
    import os
    for data in (os.urandom(100_000), b"the same words, over and over; " * 3000):
        frame = block.encode(data, 3, shuffle=True)[1]
        assert not frame.startswith(block.SHUFFLED)
        assert frame == block.encode(data, 3)[1]


def test_unknown_skippable_frame_is_rejected():
    digest, frame = block.encode(b"abc")
    other = (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"SHF\x02"
    for head in (other, block.SHUFFLED[:-1] + b"\x08", block.SHUFFLED[:6]):
        with pytest.raises(BlockFormatError, match="unknown skippable"):
            block.decode(digest, head + frame)


def test_shuffled_bomb_is_rejected_before_inflating():
    frame = zstandard.ZstdCompressor().compress(b"\0" * (block.MAX_BLOCK_SIZE + 1))
    with pytest.raises(BlockFormatError, match="more than"):
        block.decode(digests.compute(b"x"), block.SHUFFLED + frame)


def test_shuffled_frame_of_other_bytes_fails_the_digest():
    """A writer that shuffles and forgets the marker (or a marker on a plain frame) can never
    hand out wrong bytes: the digest is of the unshuffled content."""
    data = bytes(range(256)) * 64
    digest, plain = block.encode(data)
    with pytest.raises(DigestMismatch):
        block.decode(digest, block.SHUFFLED + plain)
    unmarked = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(shuffle.shuffle(data)))
    with pytest.raises(DigestMismatch):
        block.decode(digest, unmarked)


def test_one_marker_only_and_nothing_after_an_empty_frame():
    digest, frame = block.encode(b"abc")
    with pytest.raises(BlockFormatError, match="second skippable"):
        block.decode(digest, block.SHUFFLED + block.SHUFFLED + frame)
    empty_digest, empty = block.encode(b"")
    for bad in (empty + b"junk", empty[:-1]):
        with pytest.raises(BlockFormatError, match="empty zstd frame"):
            block.decode(empty_digest, bad)


def test_manifests_are_never_read_shuffled():
    """A manifest may be 16 times a block's size: its reader takes no shuffled object at all."""
    from lazyfs.errors import ManifestFormatError
    from lazyfs.records import objects
    data = b"a manifest's bytes"
    with pytest.raises(ManifestFormatError, match="only blocks"):
        objects.verify(objects.MANIFEST, digests.compute(data), _shuffled_frame(data))
    assert objects.verify(objects.BLOCK, digests.compute(data), _shuffled_frame(data)) == data

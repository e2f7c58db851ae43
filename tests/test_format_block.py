"""Block codec: round trip, digest check, bombs and garbage give typed errors."""
from __future__ import annotations

import hashlib

import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from lazyfs.errors import BlockFormatError, DigestMismatch, FormatError
from lazyfs.format import block, digest as digests


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


@given(st.binary(min_size=1, max_size=5000), st.data())
def test_flipped_frames_never_decode_to_wrong_bytes(data, draw):
    digest, frame = block.encode(data)
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

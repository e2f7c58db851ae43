"""Manifest codec: round trips, canonical form, golden vector, and total decoding of garbage."""
from __future__ import annotations

import hashlib
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lazyfs.errors import ManifestFormatError
from lazyfs.format import digest as digests, manifest as mf
from lazyfs.format.manifest import Chunk, Entry, EntryType, Manifest
from tests.strategies import manifests


def _order_preserving(m: Manifest) -> Manifest:
    """Hardlinks in the strategy point at earlier-created entries, which may sort later; drop them
    rather than re-deriving the builder's primary-selection rule here."""
    order = {e.path: mf.sort_key(e.path) for e in m.entries}
    kept = tuple(e for e in m.entries
                 if e.type != EntryType.HARDLINK or order[e.link] < order[e.path])
    return Manifest(kept, m.config, m.chunk_size)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(manifests())
def test_round_trip(m):
    m = _order_preserving(m)
    data = mf.encode(m)
    back = mf.decode(data)
    assert sorted(back.entries, key=lambda e: e.path) == sorted(m.entries, key=lambda e: e.path)
    assert back.config == m.config and back.chunk_size == m.chunk_size
    # Canonical: the decoded form re-encodes to the same bytes, whatever order it came in.
    assert mf.encode(back) == data
    assert mf.encode(Manifest(tuple(reversed(m.entries)), m.config, m.chunk_size)) == data


DECODERS = [pytest.param(mf.decode, id="decode"), pytest.param(mf.decode_config, id="decode_config")]


@pytest.mark.parametrize("decoder", DECODERS)
@settings(max_examples=500)
@given(data=st.binary(max_size=400))
def test_decode_garbage_is_typed(decoder, data):
    try:
        decoder(data)
    except ManifestFormatError:
        pass


@pytest.mark.parametrize("decoder", DECODERS)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(m=manifests(max_entries=8), data=st.data())
def test_decode_mutations_are_typed(decoder, m, data):
    raw = bytearray(mf.encode(_order_preserving(m)))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decoder(bytes(raw[:cut]))
    except ManifestFormatError:
        pass


def _golden() -> Manifest:
    digest = "sha256:" + hashlib.sha256(b"hello\n").hexdigest()
    return Manifest((
        Entry(b"", EntryType.DIR, mode=0o755, mtime_ns=1_700_000_000_123_456_789),
        Entry(b"bin", EntryType.DIR, mode=0o755),
        Entry(b"bin/hello", EntryType.REG, mode=0o4755, uid=1000, gid=1000, size=6,
              chunks=(Chunk(digest, 6),), xattrs=((b"user.k", b"v"),)),
        Entry(b"bin/hi", EntryType.HARDLINK, link=b"bin/hello"),
        Entry(b"dev", EntryType.DIR, mode=0o755),
        Entry(b"dev/null", EntryType.CHR, mode=0o666, rdev=(1, 3)),
        Entry(b"link", EntryType.SYMLINK, mode=0o777, size=9, target=b"bin/hello"),
    ), {"Env": ["PATH=/bin"]}, 1 << 20)


GOLDEN_HEX = (
    "4c5a46534d414e49010000000000100007000000150000007b22456e76223a5b22504154483d2f62696e225d7d000000"
    "00000002ed010000000000000000000000f153650000000015cd5b07000000000000030062696e02ed01000000000000"
    "00000000000000000000000000000000000001000000050068656c6c6f01ed090000e8030000e8030000000000000000"
    "000000000000010006757365722e6b01000000760600000000000000010000005891b5b522d5df086d0ff0b110fbd9d2"
    "1bb4fc7163af34d08286a2e846f6be03060000000100000002006869040200000000000000030064657602ed01000000"
    "0000000000000000000000000000000000000000000400000004006e756c6c05b6010000000000000000000000000000"
    "0000000000000000000001000000030000000000000004006c696e6b03ff010000000000000000000000000000000000"
    "00000000000000090062696e2f68656c6c6f"
)


def test_golden_vector():
    """The exact bytes of a small manifest: any change here is a format change (bump VERSION)."""
    data = mf.encode(_golden())
    assert data.hex() == GOLDEN_HEX.replace(" ", "")
    assert mf.decode(data) == _golden()


@pytest.mark.parametrize("bad, why", [
    (Manifest((Entry(b"a", EntryType.DIR),)), "root"),
    (Manifest((Entry(b"", EntryType.DIR), Entry(b"a/b", EntryType.REG))), "parent"),
    (Manifest((Entry(b"", EntryType.DIR), Entry(b"a", EntryType.REG, size=3))), "chunk"),
    (Manifest((Entry(b"", EntryType.DIR), Entry(b"a", EntryType.HARDLINK, link=b"b"))), "hardlink"),
    (Manifest((Entry(b"", EntryType.DIR), Entry(b"..", EntryType.DIR))), "name"),
    (Manifest((Entry(b"", EntryType.DIR, mode=0o17777),)), "mode"),
])
def test_encoder_rejects_invalid_trees(bad, why):
    with pytest.raises(ManifestFormatError):
        mf.encode(bad)


def test_decoder_rejects_trailing_bytes_and_versions():
    data = mf.encode(_golden())
    with pytest.raises(ManifestFormatError, match="unexpected bytes"):
        mf.decode(data + b"\0")
    with pytest.raises(ManifestFormatError, match="version"):
        mf.decode(data[:8] + b"\x02\x00" + data[10:])
    with pytest.raises(ManifestFormatError, match="magic"):
        mf.decode(b"X" + data[1:])


def _chain(depth: int, name: bytes = b"d") -> Manifest:
    """A directory inside a directory ``depth`` times."""
    return Manifest(tuple(Entry(b"/".join([name] * n), EntryType.DIR) for n in range(depth + 1)))


@pytest.mark.parametrize("depth, name", [(mf.MAX_DEPTH + 1, b"d"), (17, b"n" * 255)],
                         ids=["too-deep", "too-long"])
def test_paths_no_kernel_can_address_are_refused_by_writer_and_reader(depth, name, monkeypatch):
    """A chain of directories: each entry keeps its whole path, so without a bound a small
    manifest would cost memory growing with the square of its depth."""
    mf.decode(mf.encode(_chain(depth - 1 if name == b"d" else 15, name)))  # just inside: fine
    with pytest.raises(ManifestFormatError, match="deeper than|longer than"):
        mf.encode(_chain(depth, name))
    monkeypatch.setattr(mf, "MAX_DEPTH", 1 << 20)  # a writer that does not check
    monkeypatch.setattr(mf, "MAX_PATH", 1 << 30)
    crafted = mf.encode(_chain(depth, name))
    monkeypatch.undo()
    with pytest.raises(ManifestFormatError, match="deeper than|longer than"):
        mf.decode(crafted)


def _wide(depth: int, name_len: int, links: int) -> Manifest:
    """A file ``depth`` directories down (names of ``name_len`` bytes) and ``links`` hardlinks to
    it beside it: 26 bytes each in the manifest, each with a whole path once decoded."""
    dirs = [b"/".join(bytes([97 + k % 26]) * name_len for k in range(n)) for n in range(depth + 1)]
    held = dirs[-1] + b"/f"
    return Manifest(tuple(Entry(d, EntryType.DIR) for d in dirs) + (Entry(held, EntryType.REG),) +
                    tuple(Entry(dirs[-1] + b"/l%012d" % i, EntryType.HARDLINK, link=held)
                          for i in range(links)))


def _unchecked(m: Manifest) -> bytes:
    """``m`` encoded by a writer that does not bound its paths."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mf, "PATHS_PER_BYTE", 1 << 30)
        return mf.encode(m)


def test_a_small_manifest_of_long_paths_is_refused_before_they_are_made():
    """16 directories of 250-byte names hold 20,000 hardlinks: a 500 KB manifest (8 KB
    compressed) whose decoded paths alone would take 80 MB."""
    crafted = _unchecked(_wide(16, 250, 20_000))
    assert len(crafted) < 600_000
    with pytest.raises(ManifestFormatError, match="paths add up to more than"):
        mf.encode(_wide(16, 250, 20_000))
    tracemalloc.start()
    try:
        with pytest.raises(ManifestFormatError, match="paths add up to more than"):
            mf.decode(crafted)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < mf.paths_limit(len(crafted)) + 4 * len(crafted)  # refused as the limit was passed


@pytest.mark.parametrize("depth, name_len", [(2, 200), (190, 1)], ids=["long-names", "deep"])
def test_a_manifest_within_the_path_limit_decodes_in_a_small_multiple_of_its_size(depth, name_len):
    """Just inside the limit, with paths of long names or of many one-byte components (where
    a tuple of components kept for each entry would have cost four times its path)."""
    m = _wide(depth, name_len, 30_000)
    data = mf.encode(m)
    paths = sum(len(e.path) for e in m.entries)
    assert mf.paths_limit(len(data)) * 0.8 < paths <= mf.paths_limit(len(data))
    tracemalloc.start()
    try:
        back = mf.decode(data)
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert back == m
    assert peak < 32 * len(data), (retained, peak, len(data))


@given(manifests())
def test_the_decoder_takes_entries_in_canonical_order_only(m):
    """Canonical order compares paths component by component, which is not the byte order of
    the paths ("a" < "a/b" < "a-b" < "a0", where bytes put "a-b" before "a/b")."""
    m = Manifest(tuple(e for e in m.entries if e.type != EntryType.HARDLINK))
    canonical = mf.encode(m)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mf, "sort_key", lambda path: path)  # a writer sorting whole paths by bytes
        bytewise = mf.encode(m)
    if bytewise == canonical:
        assert mf.decode(bytewise) == mf.decode(canonical)
    else:
        with pytest.raises(ManifestFormatError, match="out of canonical order"):
            mf.decode(bytewise)


def test_names_sorting_below_the_separator_come_after_the_directory_they_extend():
    m = Manifest((Entry(b"", EntryType.DIR), Entry(b"a", EntryType.DIR), Entry(b"a/b", EntryType.DIR),
                  Entry(b"a-b", EntryType.DIR), Entry(b"a0", EntryType.DIR)))
    assert [e.path for e in mf.decode(mf.encode(m)).entries] == [b"", b"a", b"a/b", b"a-b", b"a0"]


VALID_DIGEST = "sha256:" + "ab" * 32
digest_spellings = st.one_of(
    st.just(VALID_DIGEST), st.text(max_size=80),
    st.text("0123456789abcdefABCDEF", max_size=70).map(lambda h: "sha256:" + h),
    st.sampled_from(["sha256:abcd", "sha256:" + "AB" * 32, "SHA256:" + "ab" * 32, "md5:" + "ab" * 32,
                     "sha256:" + "ab" * 32 + "\n", "sha256:" + "ab" * 33, "sha256:" + "zz" * 32]))


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(m=manifests(max_entries=8), data=st.data())
def test_the_encoder_writes_only_what_the_decoder_reads_back(m, data):
    """Whatever chunk digests, entry count or chunk size it is given, the encoder refuses what
    it cannot write, rather than writing a manifest the decoder refuses or one that reads back
    other digests (a short digest padded with zeros, uppercase hex turned lowercase)."""
    entries = [e._replace(chunks=tuple(c._replace(digest=data.draw(digest_spellings)) for c in e.chunks))
               if e.chunks and data.draw(st.booleans()) else e for e in _order_preserving(m).entries]
    entries = entries[:data.draw(st.integers(0, len(entries)))]
    chunk_size = data.draw(st.sampled_from([0, 1 << 19, (1 << 32) - 1, 1 << 32, -1]))
    m = Manifest(tuple(entries), m.config, chunk_size)
    try:
        raw = mf.encode(m)
    except ManifestFormatError:
        assert (not entries or not 0 <= chunk_size < 1 << 32 or
                not all(digests.is_valid(c.digest) for e in entries for c in e.chunks))
        return
    back = mf.decode(raw)
    assert back.chunk_size == chunk_size
    assert sorted((e.path, e.chunks) for e in back.entries) == sorted((e.path, e.chunks) for e in entries)


@pytest.mark.parametrize("bad, why", [
    (Manifest(()), "entry count"),
    (Manifest((Entry(b"", EntryType.DIR), Entry(b"f", EntryType.REG, size=1, chunks=(Chunk("sha256:abcd", 1),)))),
     "not a sha256 digest"),
    (Manifest((Entry(b"", EntryType.DIR),
               Entry(b"f", EntryType.REG, size=1, chunks=(Chunk("sha256:" + "AB" * 32, 1),)))),
     "not a sha256 digest"),
    (Manifest((Entry(b"", EntryType.DIR),), chunk_size=1 << 32), "chunk size"),
])
def test_the_encoder_refuses_what_the_format_cannot_hold(bad, why):
    with pytest.raises(ManifestFormatError, match=why):
        mf.encode(bad)


def test_the_encoder_holds_to_the_entry_limit(monkeypatch):
    monkeypatch.setattr(mf, "MAX_ENTRIES", 2)
    mf.decode(mf.encode(_chain(1)))
    with pytest.raises(ManifestFormatError, match="entry count"):
        mf.encode(_chain(2))

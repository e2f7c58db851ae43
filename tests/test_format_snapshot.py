"""Snapshot manifests: round trip, canonical bytes, and any garbage gives a typed error."""
from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings, strategies as st

from lazyfs.errors import FormatError
from lazyfs.format import snapshot as snapfmt

digests = st.binary(min_size=1, max_size=8).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest())
names = st.from_regex(r"[a-z][a-z0-9._-]{0,20}(/[a-z0-9._-]{1,20}){0,2}", fullmatch=True).filter(
    lambda n: not {".", ".."} & set(n.split("/")))
files = st.builds(lambda name, chunks: snapfmt.SnapFile(name, sum(n for _, n in chunks), tuple(chunks)),
                  names, st.lists(st.tuples(digests, st.integers(1, 1 << 24)), max_size=5))
snapshots = st.builds(snapfmt.Snapshot, digests, st.just("/run/lazyfs/snap/0123"),
                      st.lists(files, max_size=6, unique_by=lambda f: f.name).map(tuple),
                      st.floats(0, 2e9), st.just({"argv": ["python3", "x.py"]}))


@given(snapshots)
def test_round_trip_and_canonical(snap):
    data = snapfmt.encode(snap)
    back = snapfmt.decode(data)
    assert snapfmt.encode(back) == data
    assert {f.name for f in back.files} == {f.name for f in snap.files}
    assert back.blocks() == snap.blocks()


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_garbage_is_a_typed_error(data):
    for candidate in (data, snapfmt.MAGIC + data):
        try:
            snapfmt.decode(candidate)
        except FormatError:
            pass


def _good() -> bytes:
    return snapfmt.encode(snapfmt.Snapshot("sha256:" + "a" * 64, "/run/lazyfs/snap/0123abcd", (
        snapfmt.SnapFile("criu/pages-1.img", 5, (("sha256:" + "b" * 64, 5),)),
        snapfmt.SnapFile("stdio", 0, ()))))


@pytest.mark.parametrize("old, new", [
    (b'"stdio"', b'"../etc/passwd"'), (b'"stdio"', b'"/abs"'), (b'"stdio"', b'"a//b"'),
    (b'"stdio"', b'"./x"'), (b'"stdio"', b'"x\\u0000"'), (b'"size":0', b'"size":5'),
    (b'"size":0', b'"size":true'), (b'"size":5', b'"size":5.0'),
    (b'"criu/pages-1.img"', b'"t"'),  # out of order
    (b'"stdio"', b'"criu/pages-1.img"'),  # twice
    (b',5]', b',0]'), (b'"size":5', b'"size":0'),
    (b'/run/lazyfs/snap/0123abcd', b'/etc'), (b'/run/lazyfs/snap/0123abcd', b'/run/lazyfs/snap/../../etc'),
    (b'/run/lazyfs/snap/0123abcd', b'/run/lazyfs/snap/a/b'), (b'"/run/lazyfs/snap/0123abcd"', b'null'),
    (b'"created":0.0', b'"created":1e999'), (b'"created":0.0', b'"created":"2"'),
    (b'"meta":{}', b'"meta":[]'), (b'"meta":{}', b'"meta": {}'),
    (b'"meta":{}', b'"meta":{},"meta":{}'),
], ids=lambda b: b.decode(errors="replace")[:24])
def test_what_the_format_forbids_is_refused(old, new):
    data = _good()
    assert old in data, (old, data)
    snapfmt.decode(data)
    with pytest.raises(FormatError):
        snapfmt.decode(data.replace(old, new, 1))


def test_a_chunk_larger_than_a_block_is_refused():
    data = _good().replace(b',5]', b',%d]' % (16 << 20 | 1)).replace(b'"size":5', b'"size":%d' % (16 << 20 | 1))
    with pytest.raises(FormatError, match="chunks of 1 to"):
        snapfmt.decode(data)


def test_the_first_snapshots_spelling_of_non_ascii_text_still_reads():
    """Snapshots stored before their encoder took the format's canonical_json escaped non-ASCII
    text (\\u00e9): they are read as they are, not refused as non-canonical."""
    import json
    snap = snapfmt.decode(_good())
    snap = snapfmt.Snapshot(snap.image, snap.mount_path, snap.files, 1.5, {"argv": ["café"]})
    body = json.loads(snapfmt.encode(snap)[len(snapfmt.MAGIC):])
    first = snapfmt.MAGIC + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert b"\\u00e9" in first and first != snapfmt.encode(snap)
    assert snapfmt.decode(first) == snap == snapfmt.decode(snapfmt.encode(snap))


def _with_wipe(wiped) -> bytes:
    snap = snapfmt.decode(_good())
    return snapfmt.encode(snapfmt.Snapshot(snap.image, snap.mount_path, snap.files, 0.0,
                                           {"wipe_on_fork": wiped}))


def test_memory_a_fork_wipes_reads_back_by_pid():
    wiped = {"1": [[4096, 8192], [8192, 16384]], "42": [[0x7f0000000000, 0x7f0000001000]]}
    assert snapfmt.wipe_on_fork(snapfmt.decode(_with_wipe(wiped)).meta) == {
        1: ((4096, 8192), (8192, 16384)), 42: ((0x7f0000000000, 0x7f0000001000),)}
    assert snapfmt.wipe_on_fork({}) == {}  # (snapshots from before it was recorded)


@pytest.mark.parametrize("wiped", [
    [], {"1": [[4096, 4096]]}, {"1": [[4097, 8192]]}, {"1": [[0, 4096]]}, {"1": [[8192, 4096]]},
    {"1": [[4096, 12288], [8192, 16384]]}, {"1": [[8192, 12288], [4096, 8192]]},
    {"01": [[4096, 8192]]}, {"x": [[4096, 8192]]}, {"-1": [[4096, 8192]]}, {"1": [[4096]]},
    {"1": [[4096, 8192.0]]}, {"1": [[True, 8192]]}, {"1": [[4096, 1 << 60]]}, {"1": {"a": 1}},
    {"1": [[4096, 4096 + (1 << 30) + 4096]]},
], ids=str)
def test_memory_a_fork_wipes_is_checked(wiped):
    """A restore writes zeroes where this says: anything but sorted, disjoint, page-aligned user
    addresses of a bounded total is a format error, before any restore."""
    with pytest.raises(FormatError, match="wipe_on_fork"):
        snapfmt.decode(_with_wipe(wiped))

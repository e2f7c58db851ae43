"""Snapshot manifests: round trip, canonical bytes, and any garbage gives a typed error."""
from __future__ import annotations

import hashlib

from hypothesis import given, settings, strategies as st

from lazyfs.errors import FormatError
from lazyfs.format import snapshot as snapfmt

digests = st.binary(min_size=1, max_size=8).map(lambda b: "sha256:" + hashlib.sha256(b).hexdigest())
names = st.from_regex(r"[a-z][a-z0-9._-]{0,20}(/[a-z0-9._-]{1,20}){0,2}", fullmatch=True).filter(
    lambda n: ".." not in n.split("/"))
files = st.builds(lambda name, chunks: snapfmt.SnapFile(name, sum(n for _, n in chunks), tuple(chunks)),
                  names, st.lists(st.tuples(digests, st.integers(0, 1 << 24)), max_size=5))
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


def test_unsafe_names_and_bad_sizes_are_refused():
    good = snapfmt.Snapshot("sha256:" + "a" * 64, "/run/x", (snapfmt.SnapFile("stdio", 0, ()),))
    data = snapfmt.encode(good)
    for bad in (data.replace(b'"stdio"', b'"../etc/passwd"'), data.replace(b'"size":0', b'"size":5'),
                data.replace(b'"stdio"', b'"/abs"')):
        try:
            snapfmt.decode(bad)
            raise AssertionError(f"accepted {bad!r}")
        except FormatError:
            pass

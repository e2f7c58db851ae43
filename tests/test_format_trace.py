"""The read-trace codec: golden line, round trips (non-UTF-8 paths included), time order."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from lazyfs.errors import FormatError
from lazyfs.format import trace

GOLDEN = '{"t": 0.123457, "path": "/usr/lib/π.so", "offset": 4096, "size": 131072}'


def test_golden_line():
    read = trace.Read(0.1234567, "/usr/lib/π.so", 4096, 131072)
    assert trace.encode(read) == GOLDEN
    assert trace.decode(GOLDEN) == trace.Read(0.123457, "/usr/lib/π.so", 4096, 131072)


paths = st.binary(min_size=1, max_size=40).map(lambda b: "/" + b.decode("utf-8", "surrogateescape"))


@given(st.floats(0, 1e6, allow_nan=False), paths, st.integers(0, 2**62), st.integers(0, 2**31))
def test_round_trip(t, path, offset, size):
    read = trace.decode(trace.encode(trace.Read(t, path, offset, size)))
    assert read == trace.Read(round(t, 6), path, offset, size)
    # What the mount writes (surrogateescape) reads back the same from a file's bytes.
    line = trace.encode(trace.Read(t, path, offset, size)).encode("utf-8", "surrogateescape")
    assert trace.decode(line.decode("utf-8", "surrogateescape")).path == path


def test_decode_all_sorts_by_time_and_skips_blank_lines():
    lines = [trace.encode(trace.Read(t, f"/f{t}", 0, 1)) for t in (0.3, 0.1, 0.2)] + ["", "  "]
    assert [r.t for r in trace.decode_all(lines)] == [0.1, 0.2, 0.3]


@pytest.mark.parametrize("line", ['{"t": -1, "path": "/a", "offset": 0, "size": 1}', "[]", "{",
                                  '{"t": 0, "path": "/a", "offset": 1e999, "size": 1}',
                                  '{"t": NaN, "path": "/a", "offset": 0, "size": 1}',
                                  '{"t": "inf", "path": "/a", "offset": 0, "size": 1}',
                                  '{"t": 0, "path": 5, "offset": 0, "size": 1}',
                                  '{"t": 0, "path": "a", "offset": 0, "size": 1}',
                                  '{"t": 0, "path": "/a", "offset": 1.9, "size": 1}',
                                  '{"t": 0, "path": "/a", "offset": 0, "size": true}'])
def test_bad_lines_are_typed_errors(line):
    with pytest.raises(FormatError):
        trace.decode(line)


# Text with lone surrogates (st.text() leaves them out): those of U+DC80 to U+DCFF and others.
texts = st.text(st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)))


@given(texts)
def test_a_path_decoded_is_one_the_files_bytes_can_spell(text):
    """Only U+DC80 to U+DCFF stand for bytes (surrogateescape); another lone surrogate, which
    JSON can spell as an escape, is no path the image can have, and is refused here rather than
    failing whatever turns the path back into bytes."""
    line = trace.encode(trace.Read(0.5, "/" + text, 0, 1))
    try:
        read = trace.decode(line)
    except FormatError:
        with pytest.raises(UnicodeEncodeError):
            ("/" + text).encode("utf-8", "surrogateescape")
        return
    assert read.path == "/" + text
    read.path.encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "\\udc7f", "\\ud83d"])
def test_a_lone_surrogate_no_byte_stands_for_is_refused(escape):
    line = '{"t": 0, "path": "/a' + escape + '", "offset": 0, "size": 1}'
    with pytest.raises(FormatError, match="path"):
        trace.decode(line)
    with pytest.raises(FormatError):
        trace.decode_all([line])
    assert trace.decode(line.replace(escape, "\\udc80")).path.encode("utf-8", "surrogateescape") == b"/a\x80"

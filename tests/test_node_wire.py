"""The run fast path (lazyfs.node.fastrun) writes the agent's JSON by hand, to start without
importing json; these keep it in step with lazyfs.node.wire, which the agent reads and writes."""
from __future__ import annotations

from hypothesis import given, strategies as st

from lazyfs.node import fastrun, wire

# What a run request holds: names and values that are text, any of it surrogate-escaped bytes
# (paths and arguments need not be UTF-8), in lists and objects.
text = st.text(st.characters(blacklist_categories=("Cs",)) | st.sampled_from(["\udcff", "\udc80", "\x00", "\n", '"', "\\"]))
values = st.recursive(text, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                      max_leaves=12)


@given(st.dictionaries(text, values, max_size=6))
def test_what_fastrun_writes_the_agent_reads_back_exactly(request):
    line = (fastrun._json_text(request) + "\n").encode("utf-8", "surrogatepass")
    assert wire.decode(line) == request


@given(st.integers(-2**31, 2**31), st.booleans())
def test_what_the_agent_answers_fastrun_reads(number, ok):
    assert fastrun._field(wire.encode({"ok": ok, "pid": number}), b"pid") == number
    assert fastrun._field(wire.encode({"exit": number}), b"exit") == number
    assert fastrun._field(wire.encode({"ok": ok}), b"pid") is None


class _Recv:
    """A socket whose recv hands back the stream in the pieces given (one call each)."""

    def __init__(self, pieces):
        self.pieces = list(pieces)

    def recv(self, n):
        return self.pieces.pop(0) if self.pieces else b""


@given(st.integers(0, 2**22), st.integers(-255, 255), st.data())
def test_fastrun_reads_both_answers_however_they_arrive(pid, code, data):
    """The pid and the exit status may come in one recv (a run that ends at once) or split
    anywhere: each read gets its own line, and the exit status is never lost."""
    stream = wire.encode({"ok": True, "pid": pid}) + wire.encode({"exit": code})
    cuts = sorted(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=4, unique=True)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    lines = fastrun._Lines(_Recv(pieces))
    assert fastrun._field(lines.next(), b"pid") == pid
    assert fastrun._field(lines.next(), b"exit") == code
    assert lines.next() == b""

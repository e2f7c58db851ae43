"""snapshot.criuimg's readers of pstree and core images: built here field by field as CRIU writes
them (images/pstree.proto, images/core.proto), and arbitrary bytes, which read or fail typed."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from snapshot import criuimg
from snapshot.criuimg import CriuImageError


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _image(magic: int, *messages: bytes) -> bytes:
    return struct.pack("<II", criuimg.IMG_COMMON_MAGIC, magic) + b"".join(
        struct.pack("<I", len(m)) + m for m in messages)


def _core(state: int | None) -> bytes:
    """A core_entry as CRIU writes a task's: mtype, an x86 thread_info (a message), the tc with
    its task_state among fields of every wire type, and the thread_core."""
    thread_info = _field(1, 0x401000) + _field(2, b"\x00" * 24)
    entry = _field(1, 1) + _field(2, thread_info)
    if state is not None:
        fixed = _varint(5 << 3 | 1) + struct.pack("<Q", 0xFFFF_0000_1234)  # blk_sigset as fixed64
        tc = _field(1, state) + _field(2, 0) + _field(3, 0) + _field(4, 0x400140) + fixed \
            + _field(6, b"python3") + _varint(14 << 3 | 5) + struct.pack("<i", -1)
        entry += _field(3, tc)
    return _image(criuimg.CORE_MAGIC, entry + _field(5, _field(1, 0) + _field(2, 24)))


def test_the_pids_of_a_tree_and_which_were_stopped():
    tree = _image(criuimg.PSTREE_MAGIC,
                  *(_field(1, pid) + _field(2, ppid) + _field(3, 1) + _field(4, 1) + _field(5, pid)
                    for pid, ppid in ((1, 0), (7, 1), (300, 7))))
    assert criuimg.pstree_pids(tree) == [1, 7, 300]
    assert criuimg.task_state(_core(criuimg.TASK_STOPPED)) == criuimg.TASK_STOPPED
    assert criuimg.task_state(_core(1)) == 1  # alive
    assert criuimg.task_state(_core(None)) is None  # a thread's core: no task core


@pytest.mark.parametrize("reader, data, why", [
    (criuimg.pstree_pids, _image(criuimg.PSTREE_MAGIC, _field(2, 1)), "without a pid"),
    (criuimg.task_state, _image(criuimg.CORE_MAGIC, _field(3, b"\x08")), "truncated or overlong varint"),
    (criuimg.task_state, _image(criuimg.CORE_MAGIC, _varint(3 << 3 | 2) + _varint(9) + b"\x08\x03"),
     "truncated length"),
    (criuimg.task_state, _image(criuimg.CORE_MAGIC, _varint(3 << 3 | 3)), "wire type 3"),
    (criuimg.task_state, _image(criuimg.PAGEMAP_MAGIC, _field(1, 1)), "bad image magic"),
])
def test_images_that_cannot_be_read_say_why(reader, data, why):
    with pytest.raises(CriuImageError, match=why):
        reader(data)


@given(st.binary(max_size=64), st.sampled_from([criuimg.PSTREE_MAGIC, criuimg.CORE_MAGIC]))
def test_any_bytes_read_or_fail_typed(body, magic):
    data = struct.pack("<II", criuimg.IMG_COMMON_MAGIC, magic) + body
    try:
        if magic == criuimg.PSTREE_MAGIC:
            assert all(isinstance(p, int) for p in criuimg.pstree_pids(data))
        else:
            assert criuimg.task_state(data) is None or isinstance(criuimg.task_state(data), int)
    except CriuImageError:
        pass

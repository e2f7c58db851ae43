"""The mount daemon's control socket (lazyfs.fs.control) on its own: no mount needed."""
from __future__ import annotations

import gc
import uuid
import warnings

import pytest

from lazyfs.fs import control


def test_a_control_socket_that_cannot_bind_is_closed_not_left_open():
    """A second daemon for a mountpoint (or any bind failure) gets the error; the socket it
    made is closed then, not left for the garbage collector (the daemon goes on without it)."""
    mountpoint = f"/nowhere/{uuid.uuid4().hex}"
    sock = control.serve(mountpoint, lambda: {"n": 1})
    try:
        assert control.query(mountpoint) == {"n": 1}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(OSError):
                control.serve(mountpoint, dict)  # the address is taken
            gc.collect()
        assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    finally:
        sock.close()

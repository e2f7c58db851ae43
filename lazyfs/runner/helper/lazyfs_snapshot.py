"""lazyfs snapshot helper: call ready() once the process is warm. Every `lazyfs run` puts it at
/.lazyfs/python (first on PYTHONPATH); standard library only, so it can also be copied into an
image (`lazyfs snapshot-helper DIR`).

    import lazyfs_snapshot as snapshot
    # ... import torch, load weights, warm up ...
    snapshot.ready()        # snapshot taken here; a restored copy continues from this line

Outside a snapshot run ready() returns at once, so programs can call it unconditionally.
Protocol (for programs in other languages): create the file $LAZYFS_SNAPSHOT_DIR/ready, then
wait until $LAZYFS_SNAPSHOT_DIR/restored exists (it holds the restore generation, a decimal
number), then re-seed every random number generator from the OS. Memory marked MADV_WIPEONFORK is
zero by then, as in a fork's child, and has lost the flag: $LAZYFS_SNAPSHOT_DIR/wipe-on-fork
holds each process's such ranges, JSON {"PID": [[start, end], ...]}, to mark again.
"""
from __future__ import annotations

import os
import random
import re
import sys
import time

_before: list = []
_after: list = []


def before_snapshot(fn):
    """Register fn() to run just before the snapshot (close sockets, flush, drop caches)."""
    _before.append(fn)
    return fn


def after_restore(fn):
    """Register fn() to run in every restored copy (reconnect, new identities)."""
    _after.append(fn)
    return fn


def _reseed() -> None:
    # A snapshot must never let two restored copies share randomness.
    random.seed(os.urandom(32))
    np = sys.modules.get("numpy")
    if np is not None:
        # 256 bits (a 32-bit seed would repeat among some 10,000s of restored copies)
        np.random.seed([int.from_bytes(os.urandom(4), "little") for _ in range(8)])
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    ssl = sys.modules.get("ssl")
    if ssl is not None:
        # OpenSSL tells a fork by a new pid, and a restored copy keeps the snapshot's pids: its
        # TLS randoms and key shares would repeat in every copy. Its per-thread generators
        # reseed from the primary one once that has been.
        ssl.RAND_add(os.urandom(32), 32.0)


def _import_what_mark_needs() -> None:
    """Before the snapshot: what _mark() needs, in memory, if this process has wipe-on-fork
    memory for it to mark in a restored copy (a restored copy imports nothing); nothing at all
    if it has none."""
    try:
        with open("/proc/self/smaps", "rb") as f:
            has = re.search(rb"^VmFlags:.* wf\b", f.read(), re.M) is not None
    except OSError:
        has = False
    if has:
        import ctypes  # noqa: F401
        import json  # noqa: F401


def _loaded_before_the_snapshot() -> str | None:
    """The snapshot run's marker directory, if this process runs in one and loads this module
    before the snapshot: a process started in a restored copy (its pid perhaps one the record
    names for another) has none of the record's ranges, whatever its pid."""
    where = os.environ.get("LAZYFS_SNAPSHOT_DIR")
    if where and not any(os.path.exists(os.path.join(where, name)) for name in ("restored", "wipe-on-fork")):
        return where
    return None


_where = _loaded_before_the_snapshot()  # (inherited by the processes forked from this one)
_marked = False  # this process's ranges marked again (inherited: a child has the flags too)


def _mark() -> None:
    """Give this process's wipe-on-fork memory its flag back in a restored copy. The restore
    zeroed that memory, as a fork would have, and wrote its ranges, read from the tree as it was
    dumped, to the marker directory's wipe-on-fork; but CRIU does not restore the flag, and
    without it a child forked from then on would share the generator state that memory holds.
    Only a process of the snapshot has ranges there (_where)."""
    global _marked
    _marked = True
    if _where is None:
        return
    try:
        with open(os.path.join(_where, "wipe-on-fork"), "rb") as f:
            import json
            spans = json.loads(f.read()).get(str(os.getpid()), [])
    except (OSError, ValueError, AttributeError):
        return  # (none recorded, or a lazyfs before it: nothing to mark)
    if spans:
        import ctypes
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        for start, end in spans:
            madvise(start, end - start, 18)  # MADV_WIPEONFORK


def _before_fork() -> None:
    """In every Python process of the tree, also those that never call ready() (workers forked
    before the snapshot): the first fork in a restored copy marks this process's ranges again
    first, so that the child does not share its generators' state. The record is written while
    the tree is still stopped, so it is there from the copy's first instant. Otherwise one
    stat() per fork."""
    if _marked or _where is None:
        return
    if os.path.exists(os.path.join(_where, "wipe-on-fork")):
        try:
            _mark()
        except Exception:  # (a fork must not fail for it)
            pass


os.register_at_fork(before=_before_fork)


def ready(poll: float = 0.002) -> int:
    """Signal readiness and wait to be snapshotted; returns the restore generation (0 when not
    in a snapshot run)."""
    where = os.environ.get("LAZYFS_SNAPSHOT_DIR")
    if not where:
        return 0
    for fn in _before:
        fn()
    sys.stdout.flush()
    sys.stderr.flush()
    marker = os.path.join(where, "restored")
    _import_what_mark_needs()
    tmp = os.path.join(where, "ready.tmp")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.rename(tmp, os.path.join(where, "ready"))
    while not os.path.exists(marker):
        time.sleep(poll)
    with open(marker) as f:
        generation = int(f.read().strip() or 0)
    _mark()
    _reseed()
    for fn in _after:
        fn()
    return generation

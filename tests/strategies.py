"""Hypothesis strategies for valid manifests."""
from __future__ import annotations

import hashlib

from hypothesis import strategies as st

from lazyfs.format.manifest import Chunk, Entry, EntryType, Manifest

names = st.binary(min_size=1, max_size=20).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
xattrs = st.dictionaries(st.binary(min_size=1, max_size=12).filter(lambda b: b"\0" not in b),
                         st.binary(max_size=40), max_size=3).map(lambda d: tuple(sorted(d.items())))
meta = st.fixed_dictionaries({
    "mode": st.integers(0, 0o7777), "uid": st.integers(0, 2**32 - 1), "gid": st.integers(0, 2**32 - 1),
    "mtime_ns": st.integers(-(2**40) * 10**9, 2**40 * 10**9), "xattrs": xattrs})


@st.composite
def chunks(draw):
    sizes = draw(st.lists(st.integers(1, 1 << 22), max_size=4))
    return tuple(Chunk("sha256:" + hashlib.sha256(str(i).encode() + draw(st.binary(max_size=4))).hexdigest(), s)
                 for i, s in enumerate(sizes))


@st.composite
def manifests(draw, max_entries=30):
    entries = [Entry(b"", EntryType.DIR, **draw(meta))]
    dirs = [b""]
    nondirs = []
    paths = {b""}
    for _ in range(draw(st.integers(0, max_entries))):
        parent = draw(st.sampled_from(dirs))
        name = draw(names)
        path = parent + b"/" + name if parent else name
        if path in paths:
            continue
        paths.add(path)
        kind = draw(st.sampled_from(list(EntryType)))
        if kind == EntryType.HARDLINK:
            if not nondirs:
                continue
            entries.append(Entry(path, kind, link=draw(st.sampled_from(nondirs))))
            continue
        m = draw(meta)
        if kind == EntryType.REG:
            cs = draw(chunks())
            entries.append(Entry(path, kind, size=sum(c.size for c in cs), chunks=cs, **m))
        elif kind == EntryType.SYMLINK:
            target = draw(st.binary(min_size=1, max_size=60).filter(lambda b: b"\0" not in b))
            entries.append(Entry(path, kind, size=len(target), target=target, **m))
        elif kind in (EntryType.CHR, EntryType.BLK):
            entries.append(Entry(path, kind, rdev=(draw(st.integers(0, 2**32 - 1)),
                                                   draw(st.integers(0, 2**32 - 1))), **m))
        else:
            entries.append(Entry(path, kind, **m))
        if kind == EntryType.DIR:
            dirs.append(path)
        else:
            nondirs.append(path)
    config = draw(st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=10), st.integers(),
                                                                  st.lists(st.text(max_size=5), max_size=3)),
                                  max_size=3))
    return Manifest(tuple(entries), config, draw(st.sampled_from([0, 1 << 20])))

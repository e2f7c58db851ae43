"""The EROFS metadata image writer (lazyfs.format.erofs): golden vectors, fsck.erofs, and the kernel
mounting every generated image with exactly the manifest's tree."""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from lazyfs.errors import KernelLayoutUnsupported
from lazyfs.format import dataobj, erofs
from lazyfs.format.manifest import Chunk, Entry, EntryType, Manifest, link_counts
from lazyfs.fs import kernel
from lazyfs.proc import syscalls
from tests import strategies

FSCK = shutil.which("fsck.erofs")


def _chunk(data: bytes) -> Chunk:
    return Chunk("sha256:" + hashlib.sha256(data).hexdigest(), len(data))


GOLDEN = Manifest((
    Entry(b"", EntryType.DIR, 0o755, mtime_ns=1_700_000_000_000_000_000),
    Entry(b"bin", EntryType.DIR, 0o755, mtime_ns=1_700_000_000_000_000_001),
    Entry(b"bin/sh", EntryType.REG, 0o755, 0, 0, 1_700_000_000_5, size=5, chunks=(_chunk(b"hello"),),
          xattrs=((b"security.capability", b"\x01\x00\x00\x02"), (b"user.k", b"v"))),
    Entry(b"bin/sh2", EntryType.HARDLINK, link=b"bin/sh"),
    Entry(b"big", EntryType.REG, 0o600, 1000, 1000, 0, size=3 << 20,
          chunks=(_chunk(b"a" * (1 << 20)), _chunk(b"b" * (2 << 20)))),
    Entry(b"dev", EntryType.DIR, 0o755),
    Entry(b"dev/null", EntryType.CHR, 0o666, rdev=(1, 3)),
    Entry(b"dev/sda", EntryType.BLK, 0o660, rdev=(8, 300)),
    Entry(b"empty", EntryType.REG, 0o644),
    Entry(b"fifo", EntryType.FIFO, 0o600),
    Entry(b"link", EntryType.SYMLINK, 0o777, target=b"bin/sh", size=6),
    Entry(b"sock", EntryType.SOCK, 0o755, xattrs=((b"trusted.overlay.opaque", b"y"),)),
), {}, 1 << 20)
# sha256 of erofs.encode(GOLDEN, uuid=bytes(range(16))): any change to the writer's output is a
# format change (docs/format.md §12) and must be deliberate.
GOLDEN_SHA256 = "2ce030e7a5d6f99258fdf7def704445a27984318d762bb15d0aa7ca119888d8a"


def test_golden_vector():
    img = erofs.encode(GOLDEN, uuid=bytes(range(16)))
    assert hashlib.sha256(img).hexdigest() == GOLDEN_SHA256
    magic, _, _, blkbits, _, root_nid, inos = struct.unpack_from("<IIIBBHQ", img, 1024)
    assert (magic, blkbits, root_nid, inos) == (erofs.MAGIC, 12, 36, 11)  # 12 names, one hardlink
    assert len(img) % erofs.BLOCK == 0
    assert img == erofs.encode(GOLDEN, uuid=bytes(range(16)))  # deterministic


def test_object_ids():
    one = (_chunk(b"hello"),)
    assert dataobj.object_id(one) == one[0].digest[7:]  # the block file itself is the object
    two = (_chunk(b"a"), _chunk(b"b"))
    assert dataobj.object_id(two) != dataobj.object_id(two[::-1])
    assert dataobj.object_id(two) == \
        "8a61eb96679b73b792a2eb3936aefc622b1694bbb6ebf1bb588f398b2b58bc6c"
    assert dataobj.relpath("ab" * 32) == "ab/" + "ab" * 32


@pytest.mark.parametrize("entry, why", [
    (Entry(b"w", EntryType.CHR, rdev=(0, 0)), "whiteout"),
    (Entry(b"x", EntryType.REG, xattrs=((b"lustre.lov", b"1"),)), "no EROFS encoding"),
    (Entry(b"y", EntryType.REG, xattrs=((b"user.big", b"v" * 65536),)), "no EROFS encoding"),
    (Entry(b"z", EntryType.BLK, rdev=(1 << 12, 0)), "device number"),
    (Entry(b"huge", EntryType.REG, size=(1 << 43) + 1, chunks=(Chunk("sha256:" + "1" * 64, (1 << 43) + 1),)),
     "more than one EROFS chunk"),
])
def test_trees_the_layout_cannot_hold_are_refused(entry, why):
    with pytest.raises(KernelLayoutUnsupported, match=why):
        erofs.encode(Manifest((Entry(b"", EntryType.DIR), entry)))


# --- the kernel's view ---------------------------------------------------------------------------

def _skip_reason() -> str | None:
    if FSCK is None:
        return "fsck.erofs not installed (apt-get install erofs-utils)"
    return kernel.unavailable()


needs_erofs = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

_names = st.one_of(strategies.names, st.sampled_from([b"." * 3, b"-", b"!", b"~" * 200]))
_xattrs = st.dictionaries(
    st.tuples(st.sampled_from([b"user.", b"trusted.", b"security.", b"trusted.overlay."]),
              st.binary(min_size=1, max_size=12).filter(lambda b: b"\0" not in b)).map(b"".join),
    st.binary(max_size=300), max_size=3).map(lambda d: tuple(sorted(d.items())))


@st.composite
def kernel_manifests(draw):
    """Valid manifests the layout can hold: strategies.manifests with EROFS-encodable xattrs and
    device numbers, big directories and long symlinks mixed in."""
    m = draw(strategies.manifests(max_entries=40))
    out = []
    for e in m.entries:
        if e.type == EntryType.HARDLINK:
            out.append(e)
            continue
        rdev = (draw(st.integers(0, 4095)), draw(st.integers(1, (1 << 20) - 1))) \
            if e.type in (EntryType.CHR, EntryType.BLK) else (0, 0)
        target = e.target * draw(st.integers(1, 60)) if e.type == EntryType.SYMLINK else e.target
        # uid/gid 2^32-1 is the kernel's "no id" (it shows as the overflow id on any fs).
        out.append(e._replace(xattrs=draw(_xattrs), rdev=rdev, target=target[:4095],
                              uid=min(e.uid, 2**32 - 2), gid=min(e.gid, 2**32 - 2),
                              size=len(target[:4095]) if e.type == EntryType.SYMLINK else e.size))
    if draw(st.booleans()):  # a directory of several blocks
        out.append(Entry(b"zz-many", EntryType.DIR, 0o755))
        out += [Entry(b"zz-many/" + draw(_names) + b"%05d" % i, EntryType.FIFO) for i in range(300)]
    return Manifest(tuple(out), {}, m.chunk_size)


def _tree(root: Path) -> dict:
    out = {}
    base = os.fsencode(root)
    for dirpath, dirs, files in os.walk(base):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            s = os.lstat(full)
            rel = os.path.relpath(full, base)
            # The VFS keeps user.* to regular files and directories (ENODATA elsewhere), whatever
            # the filesystem stores.
            user_ok = stat.S_ISREG(s.st_mode) or stat.S_ISDIR(s.st_mode)
            xattrs = {k: os.getxattr(full, k, follow_symlinks=False)
                      for k in os.listxattr(full, follow_symlinks=False)
                      if user_ok or not k.startswith("user.")}
            out[rel] = (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid,
                        s.st_mtime_ns, s.st_size if not stat.S_ISDIR(s.st_mode) else None,
                        os.readlink(full) if stat.S_ISLNK(s.st_mode) else None,
                        (os.major(s.st_rdev), os.minor(s.st_rdev)), s.st_nlink,
                        tuple(sorted(xattrs.items())), s.st_ino)
    return out


_FMT = {EntryType.REG: stat.S_IFREG, EntryType.DIR: stat.S_IFDIR, EntryType.SYMLINK: stat.S_IFLNK,
        EntryType.CHR: stat.S_IFCHR, EntryType.BLK: stat.S_IFBLK, EntryType.FIFO: stat.S_IFIFO,
        EntryType.SOCK: stat.S_IFSOCK}


def _expected(m: Manifest) -> dict:
    entries = {e.path: e for e in m.entries}
    counts = dict(zip((e.path for e in m.entries), link_counts(m.entries)))
    out = {}
    for e in m.entries:
        if not e.path:
            continue
        holder = entries[e.link] if e.type == EntryType.HARDLINK else e
        user_ok = holder.type in (EntryType.REG, EntryType.DIR)
        xattrs = [(k.replace(b"trusted.overlay.", b"trusted.overlay.overlay.", 1), v)
                  for k, v in holder.xattrs if user_ok or not k.startswith(b"user.")]
        if holder.type == EntryType.REG and holder.size:
            xattrs += [(b"trusted.overlay.metacopy", b""), (b"trusted.overlay.redirect",
                        b"/" + dataobj.relpath(dataobj.object_id(holder.chunks)).encode())]
        out[e.path] = (_FMT[holder.type], holder.mode, holder.uid, holder.gid, holder.mtime_ns,
                       None if holder.type == EntryType.DIR else holder.size,
                       holder.target if holder.type == EntryType.SYMLINK else None,
                       holder.rdev, counts[holder.path],
                       tuple(sorted((k.decode("utf-8", "surrogateescape"), v) for k, v in xattrs)),
                       holder.path)
    return out


@needs_erofs
@pytest.mark.integration  # mounts the image in the kernel
@settings(max_examples=40, deadline=None, phases=[Phase.reuse, Phase.generate], suppress_health_check=[HealthCheck.too_slow])
@given(kernel_manifests())
def test_every_image_passes_fsck_and_mounts_as_the_manifest(m):
    with tempfile.TemporaryDirectory() as tmp:
        img, mnt = Path(tmp) / "m.img", Path(tmp) / "mnt"
        img.write_bytes(erofs.encode(m))
        mnt.mkdir()
        fsck = subprocess.run([FSCK, str(img)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        kernel.mount_one(str(img), str(mnt), "erofs", syscalls.MS_RDONLY, None)
        try:
            got = _tree(mnt)
        finally:
            kernel.unmount_one(str(mnt))
    want = _expected(m)
    assert sorted(got) == sorted(want)
    inodes: dict[bytes, int] = {}
    for path, have in got.items():
        *fields, ino = have
        *expect, holder = want[path]
        assert tuple(fields) == tuple(expect), path
        assert inodes.setdefault(holder, ino) == ino, path  # hardlinks share one inode
    assert len(set(inodes.values())) == len(inodes)  # and nothing else does


@needs_erofs
@pytest.mark.integration  # mounts the image in the kernel
def test_images_whose_inodes_end_at_a_block_boundary_pass_fsck(tmp_path):
    """fsck.erofs 1.5 reads an xattr header past every inode, so an image whose last inode ended
    exactly at its end failed it. Directories of 1 to 299 FIFOs: several of them end their
    inodes at a block boundary."""
    img = tmp_path / "m.img"
    for n in range(1, 300):
        m = Manifest((Entry(b"", EntryType.DIR),
                      *(Entry(b"%03d" % i, EntryType.FIFO) for i in range(n))))
        img.write_bytes(erofs.encode(m))
        fsck = subprocess.run([FSCK, str(img)], capture_output=True, text=True)
        assert fsck.returncode == 0, (n, fsck.stderr)

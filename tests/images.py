"""Real test images: built with umoci (the peer oracle) and with tar by hand for what umoci won't emit."""
from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

UMOCI = shutil.which("umoci")
SKOPEO = shutil.which("skopeo")


def sh(*args, **kw):
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, **kw)


def _rand(n: int, seed: int) -> bytes:
    # Deterministic but incompressible-ish content.
    import hashlib
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 4
    return bytes(out[:n])


def populate_base(root: Path) -> None:
    """Layer 1: every entry kind, odd owners and modes, xattrs, hardlinks, a multi-chunk file."""
    (root / "bin").mkdir(mode=0o755, exist_ok=True)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc" / "hostname").write_text("lazyfs-test\n")
    (root / "etc" / "os-release").write_text("NAME=lazyfs-test\nVERSION=1\n")
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "big.bin").write_bytes(_rand(3 * 1024 * 1024 + 12345, 1))
    (root / "usr" / "lib" / "empty").write_bytes(b"")
    (root / "usr" / "lib" / "same-a.txt").write_text("identical content\n" * 50)
    (root / "usr" / "lib" / "same-b.txt").write_text("identical content\n" * 50)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(root / "bin" / "tool", 0o4755)  # setuid
    os.link(root / "bin" / "tool", root / "bin" / "tool-hardlink")
    os.link(root / "bin" / "tool", root / "usr" / "lib" / "tool-other-dir")
    os.symlink("tool", root / "bin" / "tool-symlink")
    os.symlink("/etc/hostname", root / "etc" / "abs-symlink")
    os.symlink("../nowhere/dangling", root / "etc" / "dangling")
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)  # sticky
    (root / "srv" / "owned").mkdir(parents=True)
    (root / "srv" / "owned" / "data").write_text("owned by someone else\n")
    os.chown(root / "srv" / "owned" / "data", 1234, 5678)
    os.chown(root / "srv" / "owned", 4321, 8765)
    os.chmod(root / "srv" / "owned" / "data", 0o2640)  # setgid, odd mode
    os.mkfifo(root / "srv" / "fifo")
    (root / "dev").mkdir()
    os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev" / "loop9", 0o660 | stat.S_IFBLK, os.makedev(7, 9))
    os.setxattr(root / "etc" / "hostname", "user.lazyfs.test", b"value\x00\xffbinary")
    os.setxattr(root / "srv" / "owned", "user.dir-attr", b"on a directory")
    (root / "names").mkdir()
    (root / "names" / "ünïcode ✓.txt").write_text("unicode name\n")
    (root / "names" / os.fsdecode(b"latin1-\xe9.txt")).write_text("non-utf8 name\n")
    (root / "replace-me-dir" / "sub").mkdir(parents=True)
    (root / "replace-me-dir" / "sub" / "file").write_text("gone after layer 2\n")
    (root / "replace-me-file").write_text("becomes a directory\n")
    (root / "delete-me").write_text("deleted in layer 2\n")
    (root / "opaque" / "old").mkdir(parents=True)
    (root / "opaque" / "old" / "file").write_text("hidden by an opaque whiteout\n")
    (root / "opaque" / "keep-not").write_text("hidden too\n")
    for i in range(40):
        (root / "usr" / "lib" / f"small-{i:02d}.py").write_text(f"value = {i}\n" * (i + 1))


def modify_layer2(root: Path) -> None:
    """Layer 2: deletions, a directory replaced by a file and back, changed modes and content."""
    shutil.rmtree(root / "replace-me-dir")
    (root / "replace-me-dir").write_text("now a file\n")
    os.unlink(root / "replace-me-file")
    (root / "replace-me-file").mkdir()
    (root / "replace-me-file" / "inside").write_text("inside the new directory\n")
    os.unlink(root / "delete-me")
    (root / "etc" / "os-release").write_text("NAME=lazyfs-test\nVERSION=2\n")
    os.chmod(root / "usr" / "lib" / "empty", 0o600)
    os.unlink(root / "bin" / "tool-hardlink")  # a hardlink group shrinks
    (root / "etc" / "new-in-2").write_text("added in layer 2\n")


def _tar_entry(tf: tarfile.TarFile, name: str, kind=tarfile.REGTYPE, data: bytes = b"", mode=0o644,
               linkname: str = "", mtime: int = 1_600_000_000) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = mtime
    info.linkname = linkname
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def opaque_layer(path: Path) -> None:
    """Layer 3 (hand-made; umoci repack never writes opaque whiteouts)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _tar_entry(tf, "opaque/", tarfile.DIRTYPE, mode=0o750)
        _tar_entry(tf, "opaque/.wh..wh..opq")
        _tar_entry(tf, "opaque/fresh", data=b"the only visible file\n")
        _tar_entry(tf, "usr/lib/.wh.same-b.txt")
        _tar_entry(tf, "etc/.wh.not-there")  # whiteout of a missing path: allowed
        _tar_entry(tf, "replace-me-dir", tarfile.DIRTYPE, mode=0o711)  # file → directory again
        _tar_entry(tf, "replace-me-dir/back", data=b"a directory again\n")


def build_umoci_image(work: Path, tag: str = "test") -> Path:
    """A multi-layer OCI layout at work/layout:tag, built with umoci from real directory trees."""
    layout = work / "layout"
    bundle = work / "bundle"
    sh(UMOCI, "init", "--layout", layout)
    sh(UMOCI, "new", "--image", f"{layout}:{tag}")
    sh(UMOCI, "config", "--image", f"{layout}:{tag}", "--config.env", "PATH=/bin:/usr/bin",
       "--config.cmd", "/bin/sh", "--config.workingdir", "/")
    sh(UMOCI, "unpack", "--image", f"{layout}:{tag}", bundle)
    populate_base(bundle / "rootfs")
    sh(UMOCI, "repack", "--image", f"{layout}:{tag}", bundle)
    shutil.rmtree(bundle)  # repack appends to the image the bundle came from: unpack afresh
    sh(UMOCI, "unpack", "--image", f"{layout}:{tag}", bundle)
    modify_layer2(bundle / "rootfs")
    sh(UMOCI, "repack", "--image", f"{layout}:{tag}", bundle)
    opaque_layer(work / "layer3.tar")
    sh(UMOCI, "raw", "add-layer", "--image", f"{layout}:{tag}", work / "layer3.tar")
    shutil.rmtree(bundle)
    return layout


def unpack_oracle(layout: Path, tag: str, dest: Path) -> Path:
    sh(UMOCI, "unpack", "--image", f"{layout}:{tag}", dest)
    return dest / "rootfs"


def snapshot_tree(root: Path) -> dict:
    """Every entry's type, mode, owner, size, mtime, link target, xattrs, content hash; and the
    hardlink grouping as a set of frozensets of paths."""
    import hashlib
    entries = {}
    groups: dict[int, set] = {}
    base = os.fsencode(root)
    for dirpath, dirs, files in os.walk(base):
        for name in dirs + files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            fmt = stat.S_IFMT(st.st_mode)
            info = {"fmt": fmt, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                    "mtime_ns": st.st_mtime_ns, "nlink": st.st_nlink}
            if fmt != stat.S_IFDIR:
                info["size"] = st.st_size
            if stat.S_ISREG(fmt):
                with open(full, "rb") as f:
                    info["sha256"] = hashlib.sha256(f.read()).hexdigest()
                if st.st_nlink > 1:
                    groups.setdefault(st.st_ino, set()).add(rel)
            elif stat.S_ISLNK(fmt):
                info["target"] = os.readlink(full)
            elif stat.S_ISCHR(fmt) or stat.S_ISBLK(fmt):
                info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            try:
                names = sorted(os.listxattr(full, follow_symlinks=False))
                info["xattrs"] = {n: os.getxattr(full, n, follow_symlinks=False) for n in names
                                  if n.startswith("user.")}
            except OSError:
                info["xattrs"] = {}
            entries[rel] = info
    return {"entries": entries, "hardlinks": {frozenset(g) for g in groups.values()}}

"""Bad input: a clear one-line error, a non-zero exit, and the store exactly as it was."""
from __future__ import annotations

import gzip
import json
import os
import tarfile
from pathlib import Path

import pytest

from imagebuilder.ociwriter import TarEntry, make_tar, write_layout
from tests.conftest import lazyfs_cli

GOOD = [TarEntry("etc/", type=tarfile.DIRTYPE, mode=0o755), TarEntry("etc/hello", b"hello\n")]


def _listing(root: Path) -> dict:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _layout(tmp_path: Path, entries: list[TarEntry], name: str = "img") -> str:
    return f"oci:{write_layout(tmp_path / name, [make_tar(GOOD), make_tar(entries)], 'v1')}:v1"


def _swap_layer(tmp_path: Path) -> str:
    root = write_layout(tmp_path / "swapped", [make_tar(GOOD)], "v1")
    index = json.loads((root / "index.json").read_text())
    mpath = root / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
    layer = json.loads(mpath.read_text())["layers"][0]["digest"][7:]
    (root / "blobs" / "sha256" / layer).write_bytes(gzip.compress(make_tar(GOOD + [TarEntry("x", b"evil")])))
    return f"oci:{root}:v1"


def _truncated(tmp_path: Path) -> str:
    import subprocess
    root = write_layout(tmp_path / "t", [make_tar(GOOD + [TarEntry("big", os.urandom(300_000))])], "v1")
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(root, arcname=".")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) - 200_000])
    return f"oci-archive:{archive}"


def _not_image(tmp_path: Path) -> str:
    p = tmp_path / "notes.txt"
    p.write_text("this is not a container image\n")
    return str(p)


CASES = {
    "not-an-image": (_not_image, "not an image"),
    "truncated-archive": (_truncated, "not a readable tar archive"),
    "layer-digest-mismatch": (_swap_layer, "hashes to"),
    "dotdot-entry": (lambda t: _layout(t, [TarEntry("etc/../../escape", b"x")]), "contains '..'"),
    "absolute-entry": (lambda t: _layout(t, [TarEntry("/etc/passwd", b"x")]), "absolute path"),
    "hardlink-outside": (lambda t: _layout(t, [TarEntry("etc/link", type=tarfile.LNKTYPE,
                                                        linkname="../../etc/shadow")]), "contains '..'"),
    "hardlink-missing": (lambda t: _layout(t, [TarEntry("etc/link", type=tarfile.LNKTYPE,
                                                        linkname="nothing/here")]), "not in the image"),
    "write-through-symlink": (lambda t: _layout(t, [TarEntry("evil", type=tarfile.SYMTYPE, linkname="/etc"),
                                                    TarEntry("evil/passwd", b"pwned")]), "is a symlink"),
    "missing-path": (lambda t: str(t / "does-not-exist"), "no such file"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_cleanly(case, tmp_path, env_dirs):
    # A store that already holds an image must come out byte-for-byte identical.
    good = write_layout(tmp_path / "good", [make_tar(GOOD)], "v1")
    lazyfs_cli("build", f"oci:{good}:v1", "--tag", "good/img:1")
    store = Path(env_dirs["LAZYFS_STORE"])
    before = _listing(store)
    make, expected = CASES[case]
    staging = tmp_path / "staging"
    staging.mkdir()
    proc = lazyfs_cli("build", make(tmp_path), "--tag", "bad/img:1", "--tmp-dir", staging, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazyfs: error: "), proc.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert _listing(store) == before
    assert list(staging.iterdir()) == []  # the build's own temp directory is gone too


def test_bad_tag_is_refused_before_reading(tmp_path, env_dirs):
    proc = lazyfs_cli("build", str(tmp_path), "--tag", "Bad Name", check=False)
    assert proc.returncode != 0 and "invalid image name" in proc.stderr

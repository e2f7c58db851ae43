"""Hostile and broken input (tests/hostile.py): a clear one-line error, a non-zero exit, and the
store exactly as it was; or, for the cases that are legal, an image with the right meaning."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from imagebuilder.ociwriter import TarEntry, make_tar, write_layout
from lazyfs.records import objects
from lazyfs.store.local import LocalStore
from tests.conftest import ROOT, lazyfs_cli
from tests.hostile import BASE, CORPUS, Case


def _listing(root: Path) -> dict:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _truncated_archive(tmp_path: Path) -> str:
    root = write_layout(tmp_path / "t", [make_tar(BASE + [TarEntry("big", os.urandom(300_000))])], "v1")
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(root, arcname=".")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) - 200_000])
    return f"oci-archive:{archive}"


def _not_image(tmp_path: Path) -> str:
    (tmp_path / "notes.txt").write_text("this is not a container image\n")
    return str(tmp_path / "notes.txt")


EXTRA = {
    "not-an-image": Case(_not_image, "not an image"),
    "truncated-archive": Case(_truncated_archive, "not a readable tar archive"),
    "missing-path": Case(lambda t: str(t / "does-not-exist"), "no such file"),
}
ALL = {**CORPUS, **EXTRA}


def test_corpus_is_large_enough_and_documented():
    assert len(CORPUS) >= 25
    assert sum(c.expect is not None for c in CORPUS.values()) >= 20
    doc = (ROOT / "docs" / "security.md").read_text()
    assert [name for name in CORPUS if f"`{name}`" not in doc] == []  # the table lists every case


@pytest.mark.parametrize("case", sorted(ALL))
def test_hostile_input(case, tmp_path, env_dirs):
    c = ALL[case]
    # A store that already holds an image must come out byte-for-byte identical after a refusal.
    good = write_layout(tmp_path / "good", [make_tar(BASE)], "v1")
    lazyfs_cli("build", f"oci:{good}:v1", "--tag", "good/img:1")
    store_dir = Path(env_dirs["LAZYFS_STORE"])
    before = _listing(store_dir)
    staging = tmp_path / "staging"
    staging.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    proc = lazyfs_cli("build", c.make(work), "--tag", "case/img:1", "--tmp-dir", staging, *c.args,
                      check=False)
    assert list(staging.iterdir()) == []  # the build's own temp directory is gone either way
    if c.expect is None:
        assert proc.returncode == 0, proc.stderr
        store = LocalStore(store_dir)
        manifest = objects.read_manifest(store, store.get_tag("case/img", "1"))
        c.check(manifest)
        _kernel_image_is_sound(manifest, tmp_path / "meta.img")
        return
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazyfs: error: "), proc.stderr
    assert c.expect in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert _listing(store_dir) == before


def _kernel_image_is_sound(manifest, path: Path) -> None:
    """What an accepted hostile input becomes on the kernel data path: an EROFS image that
    fsck.erofs passes, or the typed refusal that sends the mount to FUSE."""
    import shutil
    import subprocess

    from lazyfs.errors import KernelLayoutUnsupported
    from lazyfs.format import erofs
    try:
        path.write_bytes(erofs.encode(manifest))
    except KernelLayoutUnsupported:
        return
    if shutil.which("fsck.erofs"):
        fsck = subprocess.run(["fsck.erofs", str(path)], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stderr


def test_bad_tag_is_refused_before_reading(tmp_path, env_dirs):
    proc = lazyfs_cli("build", str(tmp_path), "--tag", "Bad Name", check=False)
    assert proc.returncode != 0 and "invalid image name" in proc.stderr


@pytest.mark.parametrize("case", ["dotdot-entry", "truncated-gzip-layer", "missing-index"])
def test_refused_build_leaves_no_store_it_created(case, tmp_path):
    """The same refusals into a store that did not exist: not even its directory is left."""
    work = tmp_path / "work"
    work.mkdir()
    store = tmp_path / "new" / "store"
    proc = lazyfs_cli("build", CORPUS[case].make(work), "--store", store, check=False)
    assert proc.returncode == 1 and CORPUS[case].expect in proc.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("manifest, config", [
    ([{"Config": "c.json", "RepoTags": ["a:1"], "Layers": 5}], {"rootfs": {"diff_ids": ["x"]}}),
    ([{"Config": "c.json", "RepoTags": ["a:1"], "Layers": ["l.tar"]}], {"rootfs": ["not", "an", "object"]}),
    ([{"Config": "c.json", "RepoTags": [7], "Layers": ["l.tar"]}], {"rootfs": {"diff_ids": ["x"]}}),
])
def test_metadata_of_the_wrong_shape_is_one_line(tmp_path, manifest, config):
    """An image's JSON documents may hold any type where another belongs: a one-line error, no
    traceback, no store."""
    import io
    import json
    import tarfile
    archive = tmp_path / "img.tar"
    with tarfile.open(archive, "w") as tf:
        for name, doc in (("manifest.json", manifest), ("c.json", config)):
            data = json.dumps(doc).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    r = lazyfs_cli("build", f"docker-archive:{archive}:a:1", "--tag", "a/b:1", "--store",
                   tmp_path / "store", check=False)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("lazyfs: error: ") and "Traceback" not in r.stderr
    assert not (tmp_path / "store").exists()

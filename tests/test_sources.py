"""Image sources: transports, detection, tag and platform selection, layer compressions."""
from __future__ import annotations

import hashlib
import json

import pytest
import zstandard

from imagebuilder.build import build
from imagebuilder.ociwriter import TarEntry, make_tar, write_layout
from imagebuilder.sources import parse
from imagebuilder.sources.oci import REF_NAME
from lazyfs.errors import NotAnImage
from lazyfs.store.local import LocalStore

LAYER = make_tar([TarEntry("etc/", type=b"5", mode=0o755), TarEntry("etc/id", b"one\n")])


def _files(result) -> dict:
    return {e.path: e for e in result.manifest.entries}


def test_transport_parsing(tmp_path):
    (tmp_path / "a:b").mkdir()
    assert parse(f"oci:{tmp_path}/x:v1") == ("oci", f"{tmp_path}/x", "v1")
    assert parse(f"oci:{tmp_path}/a:b") == ("oci", f"{tmp_path}/a:b", None)  # an existing path wins
    assert parse(f"docker-archive:{tmp_path}/i.tar:team/app:1") == ("docker-archive", f"{tmp_path}/i.tar", "team/app:1")
    assert parse(f"dir:{tmp_path}/a:b") == ("dir", f"{tmp_path}/a:b", None)
    assert parse(str(tmp_path))[0] == "dir"


def test_tag_selection_and_listing(tmp_path):
    root = write_layout(tmp_path / "l", [LAYER], "v1")
    index = json.loads((root / "index.json").read_text())
    second = dict(index["manifests"][0], annotations={REF_NAME: "v2"})
    index["manifests"].append(second)
    (root / "index.json").write_text(json.dumps(index))
    store = LocalStore(tmp_path / "s")
    assert build(f"oci:{root}:v2", store).digest == build(f"oci:{root}:v1", store).digest
    with pytest.raises(NotAnImage, match="has: v1, v2"):
        build(f"oci:{root}:v3", store)
    with pytest.raises(NotAnImage, match="holds 2 images"):
        build(f"oci:{root}", store)


def test_platform_index_picks_this_machine(tmp_path):
    root = write_layout(tmp_path / "l", [LAYER], "v1")
    index = json.loads((root / "index.json").read_text())
    amd64 = dict(index["manifests"][0], platform={"os": "linux", "architecture": "amd64"})
    other = write_layout(tmp_path / "o", [make_tar([TarEntry("arm", b"arm")])], "v1")
    arm_desc = json.loads((other / "index.json").read_text())["manifests"][0]
    for blob in (other / "blobs" / "sha256").iterdir():
        (root / "blobs" / "sha256" / blob.name).write_bytes(blob.read_bytes())
    arm = dict(arm_desc, platform={"os": "linux", "architecture": "arm64"})
    nested = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                         "manifests": [arm, amd64]}).encode()
    digest = "sha256:" + hashlib.sha256(nested).hexdigest()
    (root / "blobs" / "sha256" / digest[7:]).write_bytes(nested)
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": len(nested),
        "annotations": {REF_NAME: "multi"}}]}))
    result = build(f"oci:{root}:multi", LocalStore(tmp_path / "s"))
    assert b"etc/id" in _files(result) and b"arm" not in _files(result)


def test_zstd_and_plain_layers(tmp_path):
    root = write_layout(tmp_path / "l", [LAYER], "v1", compress=False)
    index = json.loads((root / "index.json").read_text())
    mpath = root / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
    store = LocalStore(tmp_path / "s")
    plain = build(f"oci:{root}:v1", store)
    # Re-publish the same layer zstd-compressed: same tree, same manifest digest.
    m = json.loads(mpath.read_text())
    blob = zstandard.ZstdCompressor().compress(LAYER)
    bd = "sha256:" + hashlib.sha256(blob).hexdigest()
    (root / "blobs" / "sha256" / bd[7:]).write_bytes(blob)
    m["layers"][0] = {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": bd, "size": len(blob)}
    raw = json.dumps(m).encode()
    md = "sha256:" + hashlib.sha256(raw).hexdigest()
    (root / "blobs" / "sha256" / md[7:]).write_bytes(raw)
    index["manifests"][0].update(digest=md, size=len(raw))
    (root / "index.json").write_text(json.dumps(index))
    assert build(f"oci:{root}:v1", store).digest == plain.digest


def test_config_reaches_the_manifest(tmp_path):
    root = write_layout(tmp_path / "l", [LAYER], "v1", config={
        "Env": ["A=1"], "Cmd": ["sh"], "WorkingDir": "/w", "User": "1000", "Volumes": {"/x": {}}})
    m = build(f"oci:{root}:v1", LocalStore(tmp_path / "s")).manifest
    assert m.config == {"Env": ["A=1"], "Cmd": ["sh"], "WorkingDir": "/w", "User": "1000",
                        "architecture": "amd64", "os": "linux"}


def test_rootfs_directory_keeps_hardlinks_and_special_files(tmp_path):
    import os
    src = tmp_path / "rootfs"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"data")
    os.link(src / "d" / "f", src / "g")
    os.symlink("d/f", src / "s")
    os.mkfifo(src / "p")
    entries = _files(build(f"dir:{src}", LocalStore(tmp_path / "st")))
    assert entries[b"g"].type.name == "HARDLINK" and entries[b"g"].link == b"d/f"
    assert entries[b"s"].target == b"d/f" and entries[b"p"].type.name == "FIFO"


def test_missing_transport_path(tmp_path):
    with pytest.raises(NotAnImage, match="not a directory"):
        build(f"oci:{tmp_path}/nope:v1", LocalStore(tmp_path / "s"))
    with pytest.raises(NotAnImage):
        build(f"dir:{tmp_path}/nope", LocalStore(tmp_path / "s"))


@pytest.mark.parametrize("swapped", ["file", "directory", "parent"])
def test_a_rootfs_changed_while_it_is_read_cannot_lead_the_build_elsewhere(tmp_path, monkeypatch, swapped):
    """A tree that changes while it is read (a live container's rootfs): a file or directory
    swapped for a symlink to the host between the walk's lstat and its open is refused; a
    directory higher up swapped between two of its entries leaves the walk where it was. None of
    the host's bytes reach the image."""
    import os
    import stat
    from imagebuilder.sources import rootfs
    from lazyfs.errors import ImageSourceError
    root, host = tmp_path / "rootfs", tmp_path / "host"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "aaa").write_text("read first\n")
    (root / "etc" / "hosts").write_text("the image's\n")
    host.mkdir()
    (host / "hosts").write_text("the host's secret\n")
    # What is swapped, and on the lstat of which name (in the directory being read).
    target, when = {"file": (root / "etc" / "hosts", b"hosts"), "directory": (root / "etc", b"etc"),
                    "parent": (root / "etc", b"aaa")}[swapped]
    real = os.lstat

    def lstat_then_swap(path, *args, **kwargs):
        st = real(path, *args, **kwargs)
        if os.path.basename(os.fsencode(path)) == when and not os.path.lexists(tmp_path / "moved"):
            os.rename(target, tmp_path / "moved")
            os.symlink(host / "hosts" if swapped == "file" else host, target)
        return st

    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    seen = []

    def on_entry(entry, stream):
        seen.append(stream.read() if stream is not None else entry.path)

    if swapped == "parent":
        rootfs.walk(root, on_entry)  # on in the directory it had opened (moved, still the tree's)
        assert b"the image's\n" in seen
    else:
        with pytest.raises(ImageSourceError, match="replaced while it was read"):
            rootfs.walk(root, on_entry)
    assert not any(isinstance(s, bytes) and b"secret" in s for s in seen)


def test_a_rootfs_walk_keeps_the_xattrs_of_files_and_directories(tmp_path):
    """(Read through each directory's descriptor, /proc/self/fd/N/NAME, not by whole paths.)"""
    import os
    from imagebuilder.sources import rootfs
    root = tmp_path / "rootfs"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("hi\n")
    try:
        os.setxattr(root / "d" / "f", "user.test", b"val")
        os.setxattr(root / "d", "user.dir", b"dv")
    except OSError as exc:
        pytest.skip(f"this filesystem takes no user xattrs ({exc.strerror})")
    got = {}
    rootfs.walk(root, lambda e, s: got.setdefault(e.path, (e.xattrs, s.read() if s else None)))
    assert got[b"d"] == (((b"user.dir", b"dv"),), None)
    assert got[b"d/f"] == (((b"user.test", b"val"),), b"hi\n")

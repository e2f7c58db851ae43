"""Round trip against a peer: the mounted tree equals `umoci unpack`'s rootfs, entry by entry."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests import images
from tests.conftest import Mounted, busybox_rootfs, lazyfs_cli, needs_mount


def _diff(expected: dict, actual: dict) -> list[str]:
    problems = []
    for path in sorted(set(expected["entries"]) | set(actual["entries"])):
        e, a = expected["entries"].get(path), actual["entries"].get(path)
        if e != a:
            problems.append(f"{path!r}: umoci {e} != lazyfs {a}")
    if expected["hardlinks"] != actual["hardlinks"]:
        problems.append(f"hardlinks: umoci {expected['hardlinks']} != lazyfs {actual['hardlinks']}")
    return problems


@needs_mount
def test_mounted_tree_equals_umoci_unpack(umoci_image, env_dirs, tmp_path, data_path):
    layout, oracle = umoci_image
    digest = lazyfs_cli("build", f"oci:{layout}:test", "--tag", "rt/umoci:1").stdout.strip().splitlines()[-1]
    assert digest.startswith("sha256:")
    expected = images.snapshot_tree(oracle)
    # The peer really exercised what we claim: whiteouts, opaque dirs, replacements, hardlinks.
    assert b"opaque/fresh" in expected["entries"] and b"opaque/old" not in expected["entries"]
    assert b"delete-me" not in expected["entries"] and b"replace-me-dir/back" in expected["entries"]
    assert expected["entries"][b"replace-me-file"]["fmt"] == 0o040000
    assert frozenset({b"bin/tool", b"usr/lib/tool-other-dir"}) in expected["hardlinks"]
    assert expected["entries"][b"etc/hostname"]["xattrs"] == {"user.lazyfs.test": b"value\x00\xffbinary"}
    assert expected["entries"][b"dev/loop9"]["rdev"] == (7, 9)
    assert expected["entries"][b"srv/owned/data"]["uid"] == 1234
    assert expected["entries"][b"bin/tool"]["mode"] == 0o4755
    with Mounted("rt/umoci:1", tmp_path / "mnt") as mnt:
        actual = images.snapshot_tree(mnt)
    assert _diff(expected, actual) == []


@needs_mount
@pytest.mark.skipif(not images.SKOPEO, reason="skopeo not installed (apt-get install skopeo)")
def test_same_image_through_all_archive_forms(umoci_image, env_dirs, tmp_path):
    layout, _ = umoci_image
    forms = {"oci": f"oci:{layout}:test"}
    for transport in ("oci-archive", "docker-archive"):
        target = tmp_path / f"image.{transport}.tar"
        ref = f"{target}:rt/forms:1" if transport == "docker-archive" else str(target)
        subprocess.run(["skopeo", "copy", "--quiet", f"oci:{layout}:test", f"{transport}:{ref}"],
                       check=True, capture_output=True)
        forms[transport] = f"{transport}:{target}"
        forms[f"bare-{transport}"] = str(target)  # detected without the prefix
    digests = {}
    for form, source in forms.items():
        out = lazyfs_cli("build", source, "--tag", f"rt/{form}:1").stdout.strip().splitlines()
        digests[form] = out[-1]
    # One tree, one canonical manifest: every form yields the same digest.
    assert len(set(digests.values())) == 1, digests


@pytest.mark.skipif(not shutil.which("podman"), reason="podman not installed (apt-get install podman)")
def test_podman_save_archives(env_dirs, tmp_path):
    """What `podman save` really writes, in both its formats, builds to the same image."""
    root = busybox_rootfs(tmp_path / "rootfs")
    rootfs_tar = tmp_path / "rootfs.tar"
    subprocess.run(["tar", "-C", root, "-cf", rootfs_tar, "."], check=True)
    name = f"localhost/lazyfs-test-{os.getpid()}:1"
    subprocess.run(["podman", "import", rootfs_tar, name], check=True, capture_output=True)
    try:
        digests = set()
        for fmt in ("docker-archive", "oci-archive"):
            out = tmp_path / f"{fmt}.tar"
            subprocess.run(["podman", "save", "--format", fmt, "-o", out, name], check=True, capture_output=True)
            digests.add(lazyfs_cli("build", out, "--tag", f"podman/{fmt}:1").stdout.strip().splitlines()[-1])
        assert len(digests) == 1
        dir_digest = lazyfs_cli("build", f"dir:{root}", "--tag", "podman/dir:1").stdout.split()[-1]
        # Same files as the directory it came from (the root directory's own metadata may differ).
        from lazyfs.store.local import LocalStore
        from lazyfs.records import objects
        store = LocalStore(env_dirs["LAZYFS_STORE"])
        a = {e.path: e for e in objects.read_manifest(store, digests.pop()).entries if e.path}
        b = {e.path: e for e in objects.read_manifest(store, dir_digest).entries if e.path}
        assert a.keys() == b.keys()
        for path in a:
            assert (a[path].type, a[path].mode, a[path].size, a[path].chunks, a[path].target) == \
                (b[path].type, b[path].mode, b[path].size, b[path].chunks, b[path].target), path
    finally:
        subprocess.run(["podman", "rmi", "-f", name], capture_output=True)


@needs_mount
def test_build_with_the_shuffle_stores_weights_smaller_and_mounts_them_exactly(env_dirs, tmp_path,
                                                                              data_path):
    """`lazyfs build --shuffle`: the same image (same digest: blocks are named by their bytes),
    its weights stored byte-shuffled and smaller, read back exactly through the mount."""
    import random
    import struct
    from lazyfs.format import block
    from lazyfs.records import objects
    from lazyfs.store.local import LocalStore
    root = tmp_path / "rootfs"
    (root / "models").mkdir(parents=True)
    rng = random.Random(11)
    weights = struct.pack("<786432f", *(rng.gauss(0, 0.02) for _ in range(786432)))  # 3 MiB
    (root / "models" / "weights.bin").write_bytes(weights)
    (root / "README").write_text("a model, and a text that is stored as it is\n" * 200)
    shuffled = lazyfs_cli("build", f"dir:{root}", "--tag", "rt/model:1", "--shuffle").stdout.split()[-1]
    plain_store = tmp_path / "plain-store"
    plain = lazyfs_cli("build", f"dir:{root}", "--tag", "rt/model:1", "--store", str(plain_store)
                       ).stdout.split()[-1]
    assert shuffled == plain
    stores = LocalStore(env_dirs["LAZYFS_STORE"]), LocalStore(plain_store)
    manifest = objects.read_manifest(stores[0], shuffled)
    files = {e.path: e for e in manifest.entries}
    for path, expect_shuffled in ((b"models/weights.bin", True), (b"README", False)):
        for d in (c.digest for c in files[path].chunks):
            frame, plain_frame = stores[0].get_block(d), stores[1].get_block(d)
            assert frame.startswith(block.SHUFFLED) == expect_shuffled
            assert not plain_frame.startswith(block.SHUFFLED)
            if expect_shuffled:
                assert len(frame) < 0.95 * len(plain_frame)
    with Mounted("rt/model:1", tmp_path / "mnt", "--data-path", data_path) as mnt:
        assert (mnt / "models" / "weights.bin").read_bytes() == weights
        assert (mnt / "README").read_bytes() == (root / "README").read_bytes()

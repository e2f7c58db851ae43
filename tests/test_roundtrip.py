"""Round trip against a peer: the mounted tree equals `umoci unpack`'s rootfs, entry by entry."""
from __future__ import annotations

import subprocess

import pytest

from tests import images
from tests.conftest import Mounted, lazyfs_cli, needs_mount


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
def test_mounted_tree_equals_umoci_unpack(umoci_image, env_dirs, tmp_path):
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

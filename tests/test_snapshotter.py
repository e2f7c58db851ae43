"""The snapshotter's containerd semantics without containerd: snapshots, mounts, commits,
removal, labels, filters, and the metadata surviving a restart (containerd's own tests are
the model: snapshots/testsuite)."""
from __future__ import annotations

import os

import pytest

from lazyfs.errors import SnapshotConflict, SnapshotExists, SnapshotNotFound
from lazyfs.snapshotter import filters, overlay
from lazyfs.snapshotter.meta import ACTIVE, COMMITTED, VIEW, Info
from lazyfs.snapshotter.snapshots import SNAPSHOT_REF, Snapshotter


@pytest.fixture
def snaps(tmp_path):
    s = Snapshotter(tmp_path / "root", None)
    yield s
    s.close()


def _fs(mounts):
    (m,) = mounts
    return m.source if m.type == "bind" else dict(o.split("=", 1) for o in m.options)["upperdir"]


def test_layers_stack_as_containerd_overlay_does(snaps):
    base = snaps.prepare("extract-1", "", {})
    assert base[0].type == "bind" and base[0].options == ("rw", "rbind")
    snaps.commit("layer1", "extract-1", {"a": "1"})
    assert snaps.stat("layer1").kind == COMMITTED and snaps.stat("layer1").labels == {"a": "1"}
    with pytest.raises(SnapshotNotFound):
        snaps.stat("extract-1")  # committing renames
    (m,) = snaps.prepare("extract-2", "layer1", {})
    opts = dict(o.split("=", 1) for o in m.options)
    assert m.type == "overlay" and opts["lowerdir"] == _fs(base)
    snaps.commit("layer2", "extract-2", {})
    (top,) = snaps.prepare("container", "layer2", {})
    lowers = dict(o.split("=", 1) for o in top.options)["lowerdir"].split(":")
    assert lowers == [opts["upperdir"], _fs(base)]  # nearest first
    assert snaps.mounts("container") == [top]
    (view,) = snaps.view("look", "layer1", {})
    assert view == overlay.Mount("bind", _fs(base), ("ro", "rbind"))
    assert snaps.stat("look").kind == VIEW and snaps.stat("container").kind == ACTIVE


def test_what_containerd_is_refused(snaps):
    snaps.prepare("a", "", {})
    with pytest.raises(SnapshotExists):
        snaps.prepare("a", "", {})
    with pytest.raises(SnapshotConflict):
        snaps.prepare("b", "a", {})  # an active parent
    with pytest.raises(SnapshotNotFound):
        snaps.prepare("c", "nothing", {})
    snaps.commit("a1", "a", {})
    with pytest.raises(SnapshotConflict):
        snaps.mounts("a1")  # committed snapshots do not mount
    with pytest.raises(SnapshotConflict):
        snaps.commit("again", "a1", {})
    snaps.prepare("child", "a1", {})
    with pytest.raises(SnapshotConflict):
        snaps.remove("a1")  # it has a child
    snaps.remove("child")
    snaps.remove("a1")
    assert list(snaps.list()) == []
    assert not list((snaps.root / "snapshots").iterdir())  # their directories went too


def test_labels_update_and_filters(snaps):
    snaps.prepare("k", "", {"x": "1", "y": "2"})
    info = snaps.update("k", {"x": "9"}, ["labels.x", "labels.y"])
    assert info.labels == {"x": "9"}  # labels.y named but absent: removed
    assert snaps.update("k", {"z": "3"}, []).labels == {"z": "3"}  # no paths: all labels
    with pytest.raises(SnapshotConflict):
        snaps.update("k", {}, ["parent"])
    info = Info(1, "n", COMMITTED, "p", {SNAPSHOT_REF: "sha256:aa", "k": "v,w"})
    assert filters.matches(info, [f'labels."{SNAPSHOT_REF}"==sha256:aa,parent=="p"'])
    assert not filters.matches(info, [f'labels."{SNAPSHOT_REF}"==sha256:aa,parent=="q"'])
    assert filters.matches(info, ['parent=="q"', "kind==committed"])  # any filter may match
    assert filters.matches(info, ['labels.k=="v,w"']) and not filters.matches(info, ["name!=n"])
    assert filters.matches(info, ["name~=^x"])  # unknown operators: containerd checks itself


def test_snapshots_survive_a_restart_and_cleanup_removes_orphans(tmp_path):
    s = Snapshotter(tmp_path / "root", None)
    s.prepare("a", "", {"l": "v"})
    upper = _fs(s.mounts("a"))
    (tmp_path / "root" / "snapshots" / "999").mkdir()  # a directory a crash left behind
    s.close()
    again = Snapshotter(tmp_path / "root", None)
    try:
        assert again.stat("a").labels == {"l": "v"} and _fs(again.mounts("a")) == upper
        assert again.cleanup() == ["999"]
        assert (tmp_path / "root" / "snapshots" / str(again.stat("a").id)).is_dir()
    finally:
        again.close()


def test_cleanup_beside_a_prepare_leaves_the_new_snapshot_whole(snaps, monkeypatch):
    """containerd calls Cleanup without holding its own lock: a Prepare may run between its
    reading the snapshots and its listing their directories."""
    real_all = snaps.meta.all
    meanwhile = []

    def all_then_a_prepare():
        rows = list(real_all())
        if not meanwhile:
            meanwhile.append(snaps.prepare("new", "", {}))
        return rows
    monkeypatch.setattr(snaps.meta, "all", all_then_a_prepare)
    assert snaps.cleanup() == []
    monkeypatch.undo()
    assert meanwhile and os.path.isdir(_fs(meanwhile[0]))


def test_a_chain_label_without_a_store_is_an_ordinary_unpack(snaps):
    chain = "sha256:" + "ab" * 32
    mounts = snaps.prepare("extract-x", "", {SNAPSHOT_REF: chain})
    assert mounts[0].type == "bind"
    snaps.commit(chain, "extract-x", {SNAPSHOT_REF: chain})
    with pytest.raises(SnapshotExists):  # the committed target exists: containerd skips the layer
        snaps.prepare("extract-y", "", {SNAPSHOT_REF: chain})


def test_unpack_keys_name_the_chain_they_unpack():
    from lazyfs.snapshotter.snapshots import unpack_chain
    chain = "sha256:" + "ab" * 32
    assert unpack_chain(f"default/12/extract-123-abc {chain}") == chain
    assert unpack_chain(f"extract-1 {chain}") == chain
    for other in (f"default/12/extract-1 {chain}\n", f"default/12/{chain}", f"default/12/extract-1 {chain}x",
                  "default/12/extract-1 sha256:" + "AB" * 32):
        assert unpack_chain(other) is None, other


def test_a_snapshot_whose_image_the_store_lost_is_a_failed_precondition_not_missing():
    """NOT_FOUND is containerd's word for a snapshot that does not exist; one whose lazyfs image
    is gone from the store exists, and cannot be mounted now."""
    import grpc

    from lazyfs.errors import ManifestNotFound, SnapshotNotFound
    from lazyfs.snapshotter.service import status_of
    assert status_of(SnapshotNotFound("snapshot 'x' does not exist")) == grpc.StatusCode.NOT_FOUND
    assert status_of(ManifestNotFound("sha256:" + "0" * 64)) == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.mount
def test_a_snapshot_mounted_again_with_other_options_hands_back_its_earlier_lease(node_agent, env_dirs,
                                                                                  tmp_path):
    """The snapshotter restarted with other options (here --profile) mounts a snapshot's lazy
    lower again, as another shared mount: the lease on the first must go, or that mount and
    its daemon stay pinned for as long as the node runs."""
    import json
    import tarfile

    from imagebuilder.build import build
    from imagebuilder.ociwriter import TarEntry, make_tar, write_layout
    from lazyfs.snapshotter.images import Images
    from lazyfs.source.spec import Source
    from lazyfs.store.local import LocalStore
    from tests.conftest import lazyfs_cli
    layer = make_tar([TarEntry("etc/", type=tarfile.DIRTYPE, mode=0o755), TarEntry("etc/hi", b"hi\n")])
    store = LocalStore(env_dirs["LAZYFS_STORE"])
    (chain,) = build(f"oci:{write_layout(tmp_path / 'img', [layer])}:latest", store, "snap/app:1").chains

    def users() -> list[str]:
        status = json.loads(lazyfs_cli("node", "status", "--json").stdout)
        return sorted((im["mountpoint"], u["target"]) for im in status["images"] for u in im["users"]
                      if u["kind"] == "snapshot")

    root = tmp_path / "root"
    first = Snapshotter(root, Images(Source(str(store.root)), profile="auto"))
    try:
        with pytest.raises(SnapshotExists):  # served lazily: containerd skips the layer
            first.prepare("extract-1", "", {SNAPSHOT_REF: chain})
        lazy = first.find_target(chain, "").name
        first.prepare("container", lazy, {})
        held = users()
        assert len(held) == 1
    finally:
        first.close()
    again = Snapshotter(root, Images(Source(str(store.root)), profile="none"))  # restarted, other options
    try:
        again.mounts("container")
        now = users()
        assert len(now) == 1 and now != held
        again.remove("container")
        assert users() == []
        # A snapshot whose row went without its lease (a remove whose release failed, a crash
        # between the two): the next cleanup hands the lease back.
        again.prepare("orphan", lazy, {})
        assert len(users()) == 1
        with again.meta.transaction():
            again.meta.delete(again.meta.get("orphan"))
        again.cleanup()
        assert users() == []
    finally:
        again.close()


def test_usage_counts_each_file_once_and_not_the_work_directory(snaps):
    """As containerd's overlay snapshotter (fs.DiskUsage of fs/): hard links once, work/ not."""
    (m,) = snaps.prepare("u", "", {})
    fs = _fs([m])
    with open(os.path.join(fs, "data"), "wb") as f:
        f.write(b"x" * 8192)
    os.link(os.path.join(fs, "data"), os.path.join(fs, "again"))
    os.link(os.path.join(fs, "data"), os.path.join(fs, "third"))
    size, inodes = snaps.usage("u")
    assert inodes == 2  # fs/ itself and the one file
    top = os.lstat(fs).st_blocks * 512
    assert size == top + os.lstat(os.path.join(fs, "data")).st_blocks * 512


def test_what_containerd_calls_invalid_is_invalid_argument(snaps):
    import grpc

    from lazyfs.errors import SnapshotInvalid
    from lazyfs.snapshotter.service import status_of
    snaps.prepare("active", "", {})
    for call in (lambda: snaps.prepare("child", "active", {}),  # a parent not committed
                 lambda: snaps.prepare("", "", {}),  # no key
                 lambda: snaps.update("active", {}, ["kind"])):  # not a field that changes
        with pytest.raises(SnapshotInvalid) as refused:
            call()
        assert status_of(refused.value) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(SnapshotConflict) as busy:
        snaps.commit("c", "active", {})
        snaps.commit("c2", "c", {})  # committed already: a state, not an argument
    assert status_of(busy.value) == grpc.StatusCode.FAILED_PRECONDITION

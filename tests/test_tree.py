"""Layer semantics of the flattening tree, without any I/O."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from imagebuilder.tree import LayerEntry, Tree
from lazyfs.errors import LimitExceeded, UnsafeEntry
from lazyfs.format.manifest import EntryType

D, F, L, H = EntryType.DIR, EntryType.REG, EntryType.SYMLINK, EntryType.HARDLINK


def apply(tree: Tree, layer: int, *entries: LayerEntry) -> Tree:
    for e in entries:
        tree.apply(layer, f"L{layer}", e)
    return tree


def paths(tree: Tree) -> dict[bytes, EntryType]:
    return {e.path: e.type for e in tree.to_manifest({}, 0).entries}


def test_whiteout_hides_lower_layers_only():
    t = apply(Tree(), 0, LayerEntry(b"a", F), LayerEntry(b"b", F))
    apply(t, 1, LayerEntry(b"c", F), LayerEntry(b".wh.a", F), LayerEntry(b".wh.c", F))
    assert paths(t) == {b"": D, b"b": F, b"c": F}  # same-layer c survives its own whiteout


def test_opaque_dir_keeps_same_layer_entries_and_prunes_deep_lower_ones():
    t = apply(Tree(), 0, LayerEntry(b"d/x", F), LayerEntry(b"d/sub/y", F))
    apply(t, 1, LayerEntry(b"d/sub", D), LayerEntry(b"d/new", F), LayerEntry(b"d/.wh..wh..opq", F))
    assert paths(t) == {b"": D, b"d": D, b"d/sub": D, b"d/new": F}


def test_whiteouts_keep_what_this_layer_put_in_a_lower_directory_it_did_not_list():
    """A layer's tar need not list a directory it adds files to. When the same layer then whites
    out that directory (or makes its parent opaque), the lower content goes and the layer's own
    files stay, with the directory that holds them (OCI: same-layer entries are not hidden)."""
    t = apply(Tree(), 0, LayerEntry(b"d/sub/x", F), LayerEntry(b"d/other", F))
    apply(t, 1, LayerEntry(b"d/sub/y", F), LayerEntry(b"d/.wh..wh..opq", F))
    assert paths(t) == {b"": D, b"d": D, b"d/sub": D, b"d/sub/y": F}
    t = apply(Tree(), 0, LayerEntry(b"d/sub/x", F))
    apply(t, 1, LayerEntry(b"d/sub/y", F), LayerEntry(b"d/.wh.sub", F))
    assert paths(t) == {b"": D, b"d": D, b"d/sub": D, b"d/sub/y": F}
    t = apply(Tree(), 0, LayerEntry(b"d/sub/x", F))
    apply(t, 1, LayerEntry(b"d/.wh.sub", F))  # (nothing of this layer in it: it goes whole)
    assert paths(t) == {b"": D, b"d": D}


def test_file_replaces_directory_and_back():
    t = apply(Tree(), 0, LayerEntry(b"p/q/r", F))
    apply(t, 1, LayerEntry(b"p", F))
    assert paths(t) == {b"": D, b"p": F}
    apply(t, 2, LayerEntry(b"p", D), LayerEntry(b"p/s", F))
    assert paths(t) == {b"": D, b"p": D, b"p/s": F}


def test_hardlinks_share_an_inode_until_one_name_is_replaced():
    t = apply(Tree(), 0, LayerEntry(b"a", F, size=0), LayerEntry(b"b", H, link=b"a"))
    m = t.to_manifest({}, 0)
    assert [(e.path, e.type, e.link) for e in m.entries][1:] == [(b"a", F, b""), (b"b", H, b"a")]
    apply(t, 1, LayerEntry(b"a", F, mode=0o600))
    assert paths(t) == {b"": D, b"a": F, b"b": F}  # b keeps the old inode, now alone


def test_hardlink_primary_is_first_in_canonical_order():
    t = apply(Tree(), 0, LayerEntry(b"z", F), LayerEntry(b"a", H, link=b"z"))
    entries = {e.path: e for e in t.to_manifest({}, 0).entries}
    assert entries[b"a"].type == F and entries[b"z"].type == H and entries[b"z"].link == b"a"


def test_whiteout_of_missing_path_and_under_a_file_is_a_no_op():
    t = apply(Tree(), 0, LayerEntry(b"f", F))
    apply(t, 1, LayerEntry(b".wh.ghost", F), LayerEntry(b"f/.wh.x", F), LayerEntry(b"g/h/.wh.i", F))
    assert paths(t) == {b"": D, b"f": F}


@pytest.mark.parametrize("entries, why", [
    ([LayerEntry(b"../x", F)], "'..'"),
    ([LayerEntry(b"/x", F)], "absolute"),
    ([LayerEntry(b"l", L, target=b"/etc"), LayerEntry(b"l/passwd", F)], "symlink"),
    ([LayerEntry(b"f", F), LayerEntry(b"f/x", F)], "not a directory"),
    ([LayerEntry(b"h", H, link=b"missing")], "not in the image"),
    ([LayerEntry(b"d", D), LayerEntry(b"h", H, link=b"d")], "directory"),
    ([LayerEntry(b"x" * 256, F)], "longer than 255"),
    ([LayerEntry(b".wh.d/x", F)], "whiteout used as a directory"),
    ([LayerEntry(b".wh.", F)], "names no file"),
    ([LayerEntry(b"", F)], "root must be a directory"),
])
def test_unsafe_entries(entries, why):
    with pytest.raises(UnsafeEntry, match=why):
        apply(Tree(), 0, *entries)


def test_depth_limit():
    with pytest.raises(LimitExceeded):
        apply(Tree(), 0, LayerEntry(b"/".join([b"d"] * 300), F))


def test_the_entry_limit_counts_what_the_image_holds_not_what_its_layers_ever_added():
    """An image whose second layer deletes a directory and whose third adds as many files
    elsewhere holds what it held: the limit is on the image, not on the layers' history."""
    t = apply(Tree(max_entries=30), 0, *[LayerEntry(b"old/f%d" % i, F) for i in range(20)])
    apply(t, 1, LayerEntry(b".wh.old", F))
    apply(t, 2, *[LayerEntry(b"new/f%d" % i, F) for i in range(20)])
    apply(t, 3, LayerEntry(b"new", F))  # a directory replaced by a file
    apply(t, 4, *[LayerEntry(b"more/f%d" % i, F) for i in range(20)])
    assert t.count == len(paths(t)) == 23  # root, new, more and its 20 files
    with pytest.raises(LimitExceeded, match="more than 30 entries"):
        apply(t, 5, *[LayerEntry(b"more/g%d" % i, F) for i in range(10)])


def test_non_utf8_names_survive():
    t = apply(Tree(), 0, LayerEntry(b"caf\xe9", F))
    assert b"caf\xe9" in paths(t)


_names = st.sampled_from([b"a", b"b", b"c"])
_ops = st.tuples(st.lists(_names, min_size=1, max_size=3),
                 st.sampled_from(["file", "dir", "whiteout", "opaque"]))


@given(st.lists(st.lists(_ops, max_size=6), min_size=1, max_size=5))
def test_the_count_is_always_what_the_image_holds(layers):
    t = Tree()
    for index, ops in enumerate(layers):
        for parts, op in ops:
            head, name = parts[:-1], parts[-1]
            if op == "whiteout":
                path, kind = b"/".join(head + [b".wh." + name]), F
            elif op == "opaque":
                path, kind = b"/".join(parts + [b".wh..wh..opq"]), F
            else:
                path, kind = b"/".join(parts), F if op == "file" else D
            try:
                t.apply(index, f"L{index}", LayerEntry(path, kind))
            except UnsafeEntry:  # (a file where a later entry needs a directory)
                pass
    assert t.count == len(paths(t))

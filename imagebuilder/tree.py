"""The flattened file tree: layers are applied to it in order with OCI semantics.

The tree lives in memory and never touches the host filesystem, so a hostile layer cannot write
through a symlink or outside the image: paths are resolved here without following any link.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lazyfs.errors import LimitExceeded, UnsafeEntry
from lazyfs.format.manifest import MAX_DEPTH, MAX_ENTRIES, MAX_NAME, MAX_PATH, Chunk, Entry, EntryType, Manifest

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"


@dataclass(slots=True)
class Node:
    # What the manifest will say of this name, but its path (a node's path is where it is in the
    # tree; ``path`` stays empty). Hardlinked names share one Entry object: its identity is the inode.
    inode: Entry
    layer: int
    children: dict[bytes, "Node"] | None = None  # only for directories

    @property
    def is_dir(self) -> bool:
        return self.children is not None


@dataclass(slots=True)
class LayerEntry:
    """One entry of a layer, already decoded from tar or lstat. ``path`` is as found in the source."""

    path: bytes
    type: EntryType  # HARDLINK means ``link`` names an existing path
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    target: bytes = b""
    link: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    chunks: tuple[Chunk, ...] = field(default=())


def _new_dir(layer: int) -> Node:
    """A directory a layer creates (its metadata set from the layer's entry, if it has one)."""
    return Node(Entry(b"", EntryType.DIR, mode=0o755), layer, children={})


def split_path(layer: str, raw: bytes, what: str = "entry", entry: bytes | None = None) -> list[bytes]:
    """Components of a layer path; ``./`` prefixes are fine, anything that could escape is not.
    ``entry`` names the tar entry in errors when ``raw`` is a link target rather than its name."""
    name = (entry if entry is not None else raw).decode(errors="replace")
    if entry is not None:
        what = f"{what} {raw.decode(errors='replace')!r}"
    if raw.startswith(b"/"):
        raise UnsafeEntry(layer, name, f"{what} is an absolute path")
    if len(raw) > MAX_PATH:
        raise UnsafeEntry(layer, name[:64] + "...", f"path longer than {MAX_PATH} bytes")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    for p in parts:
        if p == b"..":
            raise UnsafeEntry(layer, name, f"{what} contains '..'")
        if len(p) > MAX_NAME:
            raise UnsafeEntry(layer, name[:64] + "...", f"a name longer than {MAX_NAME} bytes")
        if b"\0" in p:
            raise UnsafeEntry(layer, name, "name contains a NUL byte")
    if len(parts) > MAX_DEPTH:
        raise LimitExceeded(f"layer {layer}: entry {name[:64]!r}...: nested deeper than {MAX_DEPTH} levels")
    return parts


def _size(node: "Node") -> int:
    """Entries of the subtree at ``node``, itself included."""
    count, stack = 0, [node]
    while stack:
        n = stack.pop()
        count += 1
        if n.is_dir:
            stack.extend(n.children.values())
    return count


class Tree:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.root = _new_dir(-1)
        self.count = 1
        self.max_entries = max_entries

    # -- applying layers ------------------------------------------------------------------------
    def apply(self, layer_index: int, layer: str, e: LayerEntry, whiteouts: bool = True) -> None:
        parts = split_path(layer, e.path)
        if not parts:
            if e.type != EntryType.DIR:
                raise UnsafeEntry(layer, e.path.decode(errors="replace"), "the root must be a directory")
            self._set_dir_meta(self.root, e, layer_index)
            return
        name = parts[-1]
        if whiteouts and any(p.startswith(WHITEOUT) for p in parts[:-1]):
            raise UnsafeEntry(layer, e.path.decode(errors="replace"), "a whiteout used as a directory")
        if whiteouts and name.startswith(WHITEOUT):
            # Nothing to hide where the parent is not a directory (umoci writes such whiteouts
            # after replacing a directory by a file); never create parents for a whiteout.
            parent = self._find_dir(parts[:-1])
            if parent is not None:
                self._whiteout(layer, e.path, parent, name, layer_index)
            return
        parent = self._parent(layer, e.path, parts[:-1], layer_index)
        existing = parent.children.get(name)
        if e.type == EntryType.DIR:
            if existing is not None and existing.is_dir:
                self._set_dir_meta(existing, e, layer_index)
                return
            node = _new_dir(layer_index)
            self._set_dir_meta(node, e, layer_index)
        elif e.type == EntryType.HARDLINK:
            target = self._lookup_link(layer, e)
            node = Node(target.inode, layer_index)
        else:
            node = Node(Entry(b"", e.type, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.chunks, e.target,
                              b"", e.rdev, e.xattrs), layer_index)
        if existing is None:
            self._count(layer)
        else:  # (what it replaces is no longer in the image)
            self.count -= _size(existing) - 1
        parent.children[name] = node  # replaces a file or a whole directory, as OCI says

    def _count(self, layer: str) -> None:
        self.count += 1
        if self.count > self.max_entries:
            raise LimitExceeded(f"layer {layer}: image has more than {self.max_entries} entries")

    @staticmethod
    def _set_dir_meta(node: Node, e: LayerEntry, layer_index: int) -> None:
        node.inode = node.inode._replace(mode=e.mode, uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns,
                                         xattrs=e.xattrs)  # directories are never hardlinked
        node.layer = layer_index

    def _parent(self, layer: str, raw: bytes, parts: list[bytes], layer_index: int) -> Node:
        node = self.root
        for i, part in enumerate(parts):
            child = node.children.get(part)
            if child is None:
                # Tar layers may omit parent directories; create them as runtimes do.
                child = _new_dir(layer_index)
                node.children[part] = child
                self._count(layer)
            elif not child.is_dir:
                kind = "a symlink" if child.inode.type == EntryType.SYMLINK else "not a directory"
                where = b"/".join(parts[: i + 1]).decode(errors="replace")
                raise UnsafeEntry(layer, raw.decode(errors="replace"), f"parent {where!r} is {kind}")
            node = child
        return node

    def _find_dir(self, parts: list[bytes]) -> Node | None:
        node = self.root
        for part in parts:
            node = node.children.get(part)
            if node is None or not node.is_dir:
                return None
        return node

    def _lookup_link(self, layer: str, e: LayerEntry) -> Node:
        parts = split_path(layer, e.link, "hardlink target", entry=e.path)
        if not parts:
            raise UnsafeEntry(layer, e.path.decode(errors="replace"), "hardlink to the root directory")
        node = self.root
        for part in parts:
            node = node.children.get(part) if node.is_dir else None
            if node is None:
                raise UnsafeEntry(layer, e.path.decode(errors="replace"),
                                  f"hardlink to {e.link.decode(errors='replace')!r}, which is not in the image")
        if node.is_dir:
            raise UnsafeEntry(layer, e.path.decode(errors="replace"), "hardlink to a directory")
        return node

    def _whiteout(self, layer: str, raw: bytes, parent: Node, name: bytes, layer_index: int) -> None:
        # Whiteouts hide what lower layers put there; entries of this same layer stay (OCI spec).
        if name == OPAQUE:
            self._prune_lower(parent, layer_index)
            return
        victim = name[len(WHITEOUT):]
        if not victim or victim in (b".", b".."):
            raise UnsafeEntry(layer, raw.decode(errors="replace"), "whiteout names no file")
        if victim in parent.children:  # (whiting out a missing path is allowed and does nothing)
            self._hide(parent, victim, layer_index)

    def _prune_lower(self, directory: Node, layer_index: int) -> None:
        for name in list(directory.children):
            self._hide(directory, name, layer_index)

    def _hide(self, directory: Node, name: bytes, layer_index: int) -> None:
        """Hide what lower layers put at ``name`` in ``directory``, in one pass from the bottom
        up: entries of this layer stay, and so does a lower directory that still holds some
        after its own lower content went (the layer put them in through it, and its tar need
        not list the directory itself)."""
        node = directory.children[name]
        if node.is_dir:
            self._prune_lower(node, layer_index)
        if node.layer < layer_index and not node.children:
            del directory.children[name]
            self.count -= 1

    # -- output ---------------------------------------------------------------------------------
    def to_manifest(self, config: dict, chunk_size: int) -> Manifest:
        entries: list[Entry] = []
        first_path: dict[int, bytes] = {}

        def emit(path: bytes, node: Node) -> None:
            ino = node.inode
            if node.is_dir:
                entries.append(ino._replace(path=path))
                for name in sorted(node.children):
                    emit(path + b"/" + name if path else name, node.children[name])
                return
            primary = first_path.setdefault(id(ino), path)
            if primary != path:
                entries.append(Entry(path, EntryType.HARDLINK, link=primary))
                return
            size = len(ino.target) if ino.type == EntryType.SYMLINK else ino.size
            entries.append(ino._replace(path=path, size=size))

        emit(b"", self.root)
        return Manifest(tuple(entries), config, chunk_size)

    def referenced_digests(self) -> set[str]:
        out: set[str] = set()
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.is_dir:
                stack.extend(node.children.values())
            else:
                out.update(c.digest for c in node.inode.chunks)
        return out

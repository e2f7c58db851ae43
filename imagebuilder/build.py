"""`lazyfs build`: image source → flattened tree → staged blocks → store (blocks, manifest, tag)."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Protocol

from lazyfs.errors import BuildOptionError, ImageSourceError
from lazyfs.format import block, chain as chainfmt, reference
from lazyfs.format.manifest import EntryType, Manifest
from lazyfs.records import chains, metadata, objects, provenance
from lazyfs.store.base import BlockStore
from lazyfs.store.lease import Lease

from imagebuilder import sources
from imagebuilder.blocks import BlockStager, CommitStats
from lazyfs.format.manifest import DEFAULT_CHUNK_SIZE
from imagebuilder.sources import rootfs
from imagebuilder.tarlayer import read_layer
from imagebuilder.tree import LayerEntry, Tree
from lazyfs.format.manifest import MAX_ENTRIES


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> Callable[[int], None]: ...


class NoProgress:
    def task(self, description: str, total: int | None) -> Callable[[int], None]:
        return lambda n: None


@dataclass
class BuildResult:
    digest: str
    manifest: Manifest
    commit: CommitStats
    layers: int
    source: dict  # where the image came from (ImageInput.source): ref, manifest, index, platform
    chains: list[str]  # the chain ID of each layer prefix, tagged in the store (lazyfs.format.chain)


DEFAULT_MAX_SIZE = 64 << 30  # uncompressed bytes of all layers together


def build(source: str, store: BlockStore, tag: str | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
          tmp_dir: str | None = None, progress: Progress | None = None,
          max_size: int = DEFAULT_MAX_SIZE, max_entries: int = MAX_ENTRIES,
          options: sources.SourceOptions | None = None, shuffle: bool = False) -> BuildResult:
    """``shuffle``: store each block byte-shuffled where that is smaller (weights, arrays)."""
    ref = reference.parse_tagged(tag) if tag else None
    if not 0 < chunk_size <= block.MAX_BLOCK_SIZE:
        raise BuildOptionError(f"--chunk-size must be 1 to {block.MAX_BLOCK_SIZE} bytes, not {chunk_size}")
    progress = progress or NoProgress()
    # The source first: one that cannot be read (no credentials, no such image) fails before a
    # store is created. Reading it takes only its manifests and config; the layers come later.
    image = sources.open_source(source, options)
    try:
        store.check(write=True)
        return _build(source, image, store, ref, chunk_size, tmp_dir, progress, max_size, max_entries,
                      shuffle)
    except BaseException:
        store.remove_if_unused()  # a failed build leaves no trace of a store it created
        raise
    finally:
        image.close()


def _build(source: str, image: sources.ImageInput, store: BlockStore, ref: reference.Reference | None,
           chunk_size: int, tmp_dir: str | None, progress: Progress, max_size: int,
           max_entries: int, shuffle: bool) -> BuildResult:
    # The lease keeps gc from sweeping blocks this build finds in the store and reuses.
    with Lease(store, "build", conflicts=("gc",)) as lease, \
            tempfile.TemporaryDirectory(prefix="lazyfs-build-", dir=tmp_dir) as staging:
        stager = BlockStager(Path(staging), store, chunk_size, shuffle=shuffle)
        try:
            chain_ids = _chain_ids(image)
            lower: list[Manifest] = []  # the tree after each layer but the last (its chains)
            used: set[str] = set()  # with each chain's blocks, also those a later layer replaced

            def keep(t: Tree) -> None:
                if chain_ids:
                    lower.append(t.to_manifest(chainfmt.CHAIN_CONFIG, chunk_size))
                    used.update(t.referenced_digests())
            tree = _flatten(image, stager, progress, max_size, max_entries, keep)
            manifest = tree.to_manifest(image.config, chunk_size)
            used.update(tree.referenced_digests())
            advance = progress.task("publishing blocks", sum(stager.staged[d] for d in used))
            commit = stager.commit(used, advance)
        finally:
            stager.close()
        # Blocks are all in the store before the manifest that needs them (and its mount
        # metadata before the manifest that names it); the tag goes last.
        lease.check()
        manifest = metadata.attach(store, manifest)
        digest = objects.write_manifest(store, manifest)
        if chain_ids:
            lower_digests = [objects.write_manifest(store, metadata.attach(store, m)) for m in lower]
            chains.publish(store, chain_ids, lower_digests + [digest])
        if image.source.get("manifest"):
            transport = sources.parse(source)[0]
            provenance.publish(store, digest, {"transport": transport, **image.source})
        if ref:
            store.put_tag(ref.name, ref.tag, digest)
    return BuildResult(digest, manifest, commit, len(image.layers) or 1, dict(image.source),
                       chain_ids)


def _chain_ids(image: sources.ImageInput) -> list[str]:
    """The layers' chain IDs, which containerd names their snapshots by; none for a tree read
    from a directory, or layers without diff_ids (their content was verified by nothing)."""
    diff_ids = [layer.diff_id for layer in image.layers]
    if not diff_ids or not all(diff_ids):
        return []
    return chainfmt.chain_ids(diff_ids)


def _flatten(image: sources.ImageInput, stager: BlockStager, progress: Progress, max_size: int,
             max_entries: int = MAX_ENTRIES, after_lower: Callable[[Tree], None] = lambda t: None) -> Tree:
    """The tree of all layers; ``after_lower(tree)`` is called after each layer but the last."""
    tree = Tree(max_entries)

    def adder(index: int, label: str, whiteouts: bool):
        def on_entry(entry: LayerEntry, stream: BinaryIO | None) -> None:
            if entry.type == EntryType.REG and entry.size:
                if stream is None:
                    raise ImageSourceError(f"layer {label}: {entry.path!r} has no content")
                entry.chunks = stager.add(stream, entry.size, f"layer {label}: {entry.path!r}")
            tree.apply(index, label, entry, whiteouts)
        return on_entry

    if image.rootfs is not None:
        advance = progress.task(f"reading {image.rootfs}", rootfs.tree_size(image.rootfs))
        rootfs.walk(image.rootfs, adder(0, str(image.rootfs), whiteouts=False), advance)
        return tree
    budget = max_size
    for i, layer in enumerate(image.layers):
        advance = progress.task(f"layer {i + 1}/{len(image.layers)} {layer.name}", layer.size)
        with layer.open() as raw:
            budget -= read_layer(layer.name, raw, layer.digest, layer.diff_id,
                                 adder(i, layer.name, True), advance, budget)
        if i < len(image.layers) - 1:
            after_lower(tree)
    return tree

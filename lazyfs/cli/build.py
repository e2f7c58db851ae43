"""`lazyfs build`, `lazyfs images`, `lazyfs inspect`."""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from imagebuilder.blocks import DEFAULT_CHUNK_SIZE
from imagebuilder.build import DEFAULT_MAX_SIZE
from lazyfs.format.manifest import MAX_ENTRIES
from lazyfs.cli import app
from lazyfs.cli.common import JsonOpt, RichProgress, StoreOpt, err, human, out, parse_size
from lazyfs.store import objects, open_store


@app.command(help="Build an image into lazyfs blocks and a manifest, publish them to a store, "
                  "tag it, and print the manifest digest as the last line.\n\n"
                  "SOURCE is oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG] "
                  "(what docker/podman save write), dir:ROOTFS, or a bare path (detected).")
def build(
    source: str = typer.Argument(..., help="Image to read (see above)."),
    tag: Optional[str] = typer.Option(None, "--tag", "-t", help="NAME:TAG to point at the result."),
    store: Optional[str] = StoreOpt,
    chunk_size: int = typer.Option(DEFAULT_CHUNK_SIZE, "--chunk-size",
                                   help="Bytes per block; smaller files are one block each."),
    tmp_dir: Optional[str] = typer.Option(None, "--tmp-dir", help="Where blocks are staged until "
                                          "the whole image has been verified (default: $TMPDIR)."),
    max_size: str = typer.Option(f"{DEFAULT_MAX_SIZE >> 30}G", "--max-size", help="Refuse images whose layers inflate past "
                                 "this many bytes in all (decompression bombs)."),
    max_entries: int = typer.Option(MAX_ENTRIES, "--max-entries", min=1, max=MAX_ENTRIES,
                                    help="Refuse images with "
                                    "more entries (files, directories, links) than this."),
    profile_command: Optional[str] = typer.Option(None, "--profile-command", metavar="CMD",
                                                  help="After publishing, run CMD (a shell-quoted "
                                                  "command line) once in a container on the image and "
                                                  "publish its startup profile (as `lazyfs profile`)."),
):
    from imagebuilder import sources
    from imagebuilder.build import build as run_build

    sources.parse(source)  # an unreadable source spelling fails before a store is created
    if profile_command is not None and not tag:
        raise typer.BadParameter("--profile-command needs --tag (the profile is recorded on the tagged image)")
    st = open_store(store)
    with RichProgress() as progress:
        result = run_build(source, st, tag, chunk_size=chunk_size, tmp_dir=tmp_dir, progress=progress,
                           max_size=parse_size(max_size), max_entries=max_entries)
    c = result.commit
    err.print(f"built {tag or source}: {len(result.manifest.entries)} entries from {result.layers} "
              f"layer(s); {c.blocks} blocks ({human(c.raw_bytes)}), {c.uploaded} new to {st.url} "
              f"({human(c.uploaded_bytes)} written)", highlight=False)
    if profile_command is not None:
        _record_profile(tag, profile_command, store, st)
    print(result.digest)


def _record_profile(tag: str, command: str, store: Optional[str], st) -> None:
    import shlex

    from lazyfs.remote.source import Source
    from lazyfs.runner.profile_run import record
    from lazyfs.runner.session import RunOptions

    argv = shlex.split(command)
    if not argv:
        raise typer.BadParameter("--profile-command is empty")
    _, prof = record(RunOptions(tag, argv, Source(store)), st)
    err.print(f"startup profile of {tag}: {len(prof.blocks)} blocks ({human(prof.bytes)}) from "
              f"`{command}`", highlight=False)


@app.command(help="List the tagged images in a store.")
def images(store: Optional[str] = StoreOpt, as_json: bool = JsonOpt):
    from lazyfs.imagestats import all_images, logical_size, store_summary

    st = open_store(store)
    imgs = all_images(st)
    summary = store_summary(st, imgs)
    if as_json:
        rows = [{"ref": ref, "digest": d, "entries": len(m.entries), "bytes": logical_size(m)}
                for ref, d, m in imgs]
        print(json.dumps({"images": rows, "store": summary}, indent=2))
        return
    table = Table("IMAGE", "DIGEST", "ENTRIES", "SIZE", box=None)
    for ref, digest, m in imgs:
        table.add_row(ref, digest[:19], str(len(m.entries)), human(logical_size(m)))
    out.print(table)
    out.print(f"{summary['images']} image(s): {human(summary['logical_bytes'])} of files, "
              f"{human(summary['unique_block_bytes'])} unique, {human(summary['bytes_stored'])} stored "
              f"(dedup {summary['dedup_ratio']}x)", highlight=False)


@app.command(help="Show an image's files, bytes, blocks, bytes stored and dedup ratio.")
def inspect(ref: str = typer.Argument(..., metavar="NAME:TAG"), store: Optional[str] = StoreOpt,
            as_json: bool = JsonOpt):
    from lazyfs import profiles
    from lazyfs.imagestats import all_images, block_sizes, image_stats

    st = open_store(store)
    digest = objects.resolve(st, ref)
    manifest = objects.read_manifest(st, digest)
    others = {d: set(block_sizes(m)) for _, d, m in all_images(st)}
    stats = image_stats(st, ref, digest, manifest, others)
    prof = profiles.load(st, digest)
    profile = None if prof is None else {
        "blocks": len(prof.blocks), "bytes": prof.bytes, "argv": prof.meta.get("argv"),
        "recorded": prof.meta.get("recorded"), "read_bytes": prof.meta.get("read_bytes")}
    if as_json:
        print(json.dumps({**stats.to_dict(), "config": manifest.config, "profile": profile}, indent=2))
        return
    table = Table(box=None, show_header=False)
    for key, value in stats.to_dict().items():
        shown = human(value) if key.endswith("bytes") or key.endswith("stored") else str(value)
        table.add_row(key.replace("_", " "), shown)
    table.add_row("startup profile", "none (lazyfs profile records one)" if profile is None else
                  f"{profile['blocks']} blocks, {human(profile['bytes'])}, from "
                  f"`{' '.join(profile['argv'] or [])}`")
    out.print(table)

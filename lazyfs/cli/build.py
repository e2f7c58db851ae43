"""`lazyfs build`, `lazyfs images`, `lazyfs inspect`."""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from lazyfs.format.manifest import DEFAULT_CHUNK_SIZE
from imagebuilder.build import DEFAULT_MAX_SIZE
from imagebuilder.sources.model import DownloadLimits
from lazyfs.format.manifest import MAX_ENTRIES
from lazyfs.cli import app
from lazyfs.cli.common import (JsonOpt, RichProgress, StoreOpt, err, human, out, parse_bool, parse_duration,
                               parse_size)
from lazyfs.errors import NotFound
from lazyfs.source.defaults import duration
from lazyfs.records import objects
from lazyfs.store import open_store

LIMITS = DownloadLimits()


@app.command(help="Build an image into lazyfs blocks and a manifest, publish them to a store, "
                  "tag it, and print the manifest digest as the last line.\n\n"
                  "SOURCE is docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST] (a registry, read "
                  "directly: credentials from --creds or the docker/podman auth files), "
                  "oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG] "
                  "(what docker/podman save write), dir:ROOTFS, or a bare path (detected).")
def build(
    source: str = typer.Argument(..., help="Image to read (see above)."),
    tag: Optional[str] = typer.Option(None, "--tag", "-t", help="NAME:TAG to point at the result."),
    store: Optional[str] = StoreOpt,
    chunk_size: str = typer.Option(str(DEFAULT_CHUNK_SIZE), "--chunk-size", metavar="SIZE",
                                   help="Bytes per block, up to 16 MiB (e.g. 512k, 1M); smaller "
                                   "files are one block each."),
    shuffle: bool = typer.Option(False, "--shuffle", help="Store each block byte-shuffled where "
                                 "that compresses better: model weights and other arrays of numbers "
                                 "(float32, float16, bfloat16) come out 5-10 % smaller, for about "
                                 "twice the compression time (docs/format.md §2.1)."),
    tmp_dir: Optional[str] = typer.Option(None, "--tmp-dir", help="Where blocks are staged until "
                                          "the whole image has been verified (default: $TMPDIR)."),
    max_size: str = typer.Option(f"{DEFAULT_MAX_SIZE >> 30}G", "--max-size", help="Refuse images whose layers inflate past "
                                 "this many bytes in all (decompression bombs)."),
    max_entries: int = typer.Option(MAX_ENTRIES, "--max-entries", min=1, max=MAX_ENTRIES,
                                    help="Refuse images with "
                                    "more entries (files, directories, links) than this."),
    platform: Optional[str] = typer.Option(None, "--platform", metavar="OS/ARCH[/VARIANT]",
                                           help="Which image to take from a multi-platform index "
                                           "(default: this machine's, e.g. linux/amd64)."),
    creds: Optional[str] = typer.Option(None, "--creds", metavar="USER:PASS", envvar="LAZYFS_REGISTRY_CREDS",
                                        help="Registry credentials for docker:// (default: the "
                                        "entry for the registry in $REGISTRY_AUTH_FILE, "
                                        "$XDG_RUNTIME_DIR/containers/auth.json, "
                                        "~/.config/containers/auth.json or ~/.docker/config.json)."),
    tls_verify: str = typer.Option("true", "--tls-verify", metavar="BOOL",
                                   help="Verify the registry's TLS certificate (docker://). "
                                   "--tls-verify=false also allows a plain-HTTP registry."),
    stall_timeout: str = typer.Option(duration(LIMITS.stall), "--stall-timeout", metavar="DURATION",
                                      envvar="LAZYFS_REGISTRY_STALL_TIMEOUT", show_envvar=True,
                                      help="docker://: a download that gets no byte for this long "
                                      "(resumes included) fails."),
    min_rate: str = typer.Option(f"{LIMITS.min_rate >> 10}k", "--min-rate", metavar="BYTES",
                                 envvar="LAZYFS_REGISTRY_MIN_RATE", show_envvar=True,
                                 help="docker://: a download that brings fewer bytes a second than "
                                 "this, averaged over each --rate-window, fails (0: no minimum)."),
    rate_window: str = typer.Option(duration(LIMITS.window), "--rate-window", metavar="DURATION",
                                    envvar="LAZYFS_REGISTRY_RATE_WINDOW", show_envvar=True,
                                    help="docker://: the window --min-rate is averaged over."),
    profile_command: Optional[str] = typer.Option(None, "--profile-command", metavar="CMD",
                                                  help="After publishing, run CMD (a shell-quoted "
                                                  "command line) once in a container on the image and "
                                                  "publish its startup profile (as `lazyfs profile`)."),
):
    from imagebuilder import sources
    from imagebuilder.build import build as run_build

    sources.parse(source)  # an unreadable source spelling fails before a store is created
    limits = DownloadLimits(parse_duration(stall_timeout), int(parse_size(min_rate)), parse_duration(rate_window))
    options = sources.SourceOptions(platform or "", creds, parse_bool("--tls-verify", tls_verify), limits)
    if platform:
        from imagebuilder.sources.oci import parse_platform
        parse_platform(platform)  # a misspelt platform fails before a store is created, too
    if profile_command is not None and not tag:
        raise typer.BadParameter("--profile-command needs --tag (the profile is recorded on the tagged image)")
    st = open_store(store)
    with RichProgress() as progress:
        result = run_build(source, st, tag, chunk_size=_bytes(chunk_size), tmp_dir=tmp_dir, progress=progress,
                           max_size=parse_size(max_size), max_entries=max_entries, options=options,
                           shuffle=shuffle)
    c = result.commit
    if result.source.get("manifest"):
        err.print(f"source {result.source.get('ref', source)} {result.source['manifest']} "
                  f"({result.source.get('platform', '?')})", highlight=False)
    err.print(f"built {tag or source}: {len(result.manifest.entries)} entries from {result.layers} "
              f"layer(s); {c.blocks} blocks ({human(c.raw_bytes)}), {c.uploaded} new to {st.url} "
              f"({human(c.uploaded_bytes)} written)", highlight=False)
    if profile_command is not None:
        _record_profile(tag, profile_command, store, st)
    print(result.digest)


def _record_profile(tag: str, command: str, store: Optional[str], st) -> None:
    import shlex

    from lazyfs.source.spec import Source
    from lazyfs.runner.profile_run import record
    from lazyfs.runner.session import RunOptions

    argv = shlex.split(command)
    if not argv:
        raise typer.BadParameter("--profile-command is empty")
    _, prof = record(RunOptions(tag, argv, Source(store)), st)
    err.print(f"startup profile of {tag}: {len(prof.blocks)} blocks ({human(prof.bytes)}) from "
              f"`{command}`", highlight=False)


def _source_digest(text: str) -> str:
    """A digest, or any reference that pins one (``docker://reg/app@sha256:…``, ``app@sha256:…``)."""
    from lazyfs.format import digest as digests

    candidate = text.rpartition("@")[2] if "@" in text else text
    if not digests.is_valid(candidate):
        raise typer.BadParameter(f"{text!r} names no digest (expected sha256:HEX or REF@sha256:HEX)")
    return candidate


def _source_text(record) -> str:
    return "" if record is None else record.source.get("ref", record.source.get("manifest", ""))


@app.command(help="List the tagged images in a store, with what each was built from. With "
                  "--source, only the image built from that source manifest or index digest.")
def images(store: Optional[str] = StoreOpt, as_json: bool = JsonOpt,
           source: Optional[str] = typer.Option(None, "--source", metavar="DIGEST|REF@DIGEST",
                                                help="Find the lazyfs image built from this source "
                                                "manifest or image index digest (docker://reg/app@sha256:…).")):
    from lazyfs.records import provenance
    from lazyfs.records.imagestats import all_images, logical_size, store_summary

    st = open_store(store)
    imgs = all_images(st)
    records = {d: provenance.of_image(st, d) for d in {d for _, d, _ in imgs}}
    if source is not None:
        found = provenance.built_from(st, _source_digest(source))
        if found is None:
            raise NotFound(f"no image in {st.url} was built from {source}")
        imgs = [row for row in imgs if row[1] == found.image] or [
            ("(untagged)", found.image, objects.read_manifest(st, found.image))]
        records[found.image] = found
    summary = store_summary(st, imgs)
    if as_json:
        rows = [{"ref": ref, "digest": d, "entries": len(m.entries), "bytes": logical_size(m),
                 "source": None if records.get(d) is None else records[d].source} for ref, d, m in imgs]
        print(json.dumps({"images": rows, "store": summary}, indent=2))
        return
    table = Table("IMAGE", "DIGEST", "ENTRIES", "SIZE", "SOURCE", box=None)
    for ref, digest, m in imgs:
        table.add_row(ref, digest[:19], str(len(m.entries)), human(logical_size(m)),
                      _source_text(records.get(digest)))
    out.print(table)
    out.print(f"{summary['images']} image(s): {human(summary['logical_bytes'])} of files, "
              f"{human(summary['unique_block_bytes'])} unique, {human(summary['bytes_stored'])} stored "
              f"(dedup {summary['dedup_ratio']}x)", highlight=False)


@app.command(help="Show an image's files, bytes, blocks, bytes stored, dedup ratio, startup "
                  "profile, mount metadata and source (registry reference, source manifest digest, platform).")
def inspect(ref: str = typer.Argument(..., metavar="NAME:TAG"), store: Optional[str] = StoreOpt,
            as_json: bool = JsonOpt):
    from lazyfs.records import profiles, provenance
    from lazyfs.records.imagestats import all_images, block_sizes, image_stats

    st = open_store(store)
    digest = objects.resolve(st, ref)
    manifest = objects.read_manifest(st, digest)
    others = {d: set(block_sizes(m)) for _, d, m in all_images(st)}
    stats = image_stats(st, ref, digest, manifest, others)
    prof = profiles.load(st, digest)
    profile = None if prof is None else {
        "blocks": len(prof.blocks), "bytes": prof.bytes, "argv": prof.meta.get("argv"),
        "recorded": prof.meta.get("recorded"), "read_bytes": prof.meta.get("read_bytes")}
    record = provenance.of_image(st, digest)
    source = None if record is None else {**record.source, "built": record.meta.get("built")}
    if as_json:
        print(json.dumps({**stats.to_dict(), "config": manifest.config, "profile": profile,
                          "source": source, "mount_metadata": manifest.meta}, indent=2))
        return
    table = Table(box=None, show_header=False)
    for key, value in stats.to_dict().items():
        shown = human(value) if key.endswith("bytes") or key.endswith("stored") else str(value)
        table.add_row(key.replace("_", " "), shown)
    table.add_row("startup profile", "none (lazyfs profile records one)" if profile is None else
                  f"{profile['blocks']} blocks, {human(profile['bytes'])}, from "
                  f"`{' '.join(profile['argv'] or [])}`")
    table.add_row("mount metadata", manifest.meta or "none shipped (nodes make the EROFS image "
                  "themselves, or serve the image through FUSE)")
    if source is None:
        table.add_row("source", "not recorded (built from a root filesystem, or before lazyfs recorded sources)")
    for key, label in (("ref", "source"), ("manifest", "source manifest"), ("index", "source index"),
                       ("platform", "platform")):
        if source and source.get(key):
            table.add_row(label, source[key])
    out.print(table)


def _bytes(text: str) -> int:
    """A size (512k, 1M), or plain bytes as they are (a negative one is for the build to refuse
    in its own words)."""
    return int(text) if text.strip().lstrip("-").isdigit() else parse_size(text)

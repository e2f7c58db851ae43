"""Image sources, named with the transports skopeo and podman users know.

``docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]`` (a registry), ``oci:DIR[:TAG]``,
``oci-archive:FILE[:TAG]``, ``docker-archive:FILE[:NAME:TAG]``, ``dir:ROOTFS``; a bare path is
detected from its contents.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tarfile
from pathlib import Path

from lazyfs.errors import NotAnImage, UnsupportedTransport

from imagebuilder.sources import docker, dockerref, oci
from imagebuilder.sources.blobs import DirBlobs, TarBlobs
from imagebuilder.sources.model import DownloadLimits, ImageInput, LayerRef, SourceOptions

TRANSPORTS = ("docker", "oci", "oci-archive", "docker-archive", "dir")
# What a transport prefix looks like (skopeo's docker://, containers-storage:, ...): a spec that
# starts so and names no existing path is a transport this build cannot read, not a missing file.
_TRANSPORT_RE = re.compile(r"^([a-z][a-z0-9+.-]*):")

__all__ = ["open_source", "parse", "DownloadLimits", "ImageInput", "LayerRef", "SourceOptions", "TRANSPORTS"]


def _split_ref(rest: str) -> tuple[str, str | None]:
    """PATH[:REF], where PATH itself may contain ':' if such a path exists."""
    if os.path.exists(rest) or ":" not in rest:
        return rest, None
    path, _, ref = rest.partition(":")
    return path, ref or None


def parse(spec: str) -> tuple[str, str, str | None]:
    """Return (transport, path, ref); for ``docker://`` the path is the registry reference."""
    if dockerref.is_docker(spec):
        return "docker", str(dockerref.parse(spec)), None
    transport, colon, rest = spec.partition(":")
    if colon and transport in TRANSPORTS:
        if transport == "dir":
            return "dir", rest, None
        path, ref = _split_ref(rest)
        return transport, path, ref
    other = _TRANSPORT_RE.match(spec)
    if other and not os.path.exists(spec) and not os.path.exists(spec.partition(":")[0]):
        supported = ", ".join("docker://" if t == "docker" else f"{t}:" for t in TRANSPORTS)
        raise UnsupportedTransport(f"{spec}: unsupported image transport {other.group(1)!r} "
                                   f"(supported: {supported}, or a path to a layout, archive or "
                                   "root filesystem)")
    return _detect(spec), spec, None


def _detect(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        return "oci" if (p / "oci-layout").is_file() else "dir"
    if not p.exists():
        raise NotAnImage(f"{path}: no such file or directory")
    try:
        with tarfile.open(p, mode="r:") as tf:
            names = {n.lstrip("./") for n in tf.getnames()}
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise NotAnImage(f"{path}: not an image (not a tar archive or directory: {exc})") from None
    if "oci-layout" in names:
        return "oci-archive"
    if "manifest.json" in names:
        return "docker-archive"
    raise NotAnImage(f"{path}: a tar archive, but neither an OCI archive nor a docker-archive")


def open_source(spec: str, options: SourceOptions | None = None) -> ImageInput:
    options = options or SourceOptions()
    platform = options.platform or oci.HOST_PLATFORM
    oci.parse_platform(platform)  # a misspelt --platform fails before anything is read
    transport, path, ref = parse(spec)
    try:
        if transport == "docker":
            from imagebuilder.sources import remote  # urllib3 and the auth code only when needed

            return remote.load(spec, dataclasses.replace(options, platform=platform))
        image = _open_local(transport, path, ref, platform)
    except (AttributeError, TypeError, KeyError, IndexError) as exc:
        # An image's JSON documents are free-form: a field of the wrong type (a list where an
        # object belongs, a number where a list does) is a malformed image, not a crash.
        raise NotAnImage(f"{spec}: malformed image metadata ({type(exc).__name__}: {exc})") from None
    image.source.setdefault("ref", f"{transport}:{os.path.abspath(path)}" + (f":{ref}" if ref else ""))
    return image


def _open_local(transport: str, path: str, ref: str | None, platform: str) -> ImageInput:
    p = Path(path)
    label = f"{transport}:{path}"
    if transport == "dir":
        if not p.is_dir():
            raise NotAnImage(f"{label}: not a directory")
        return ImageInput(label, rootfs=p)
    if transport == "oci":
        if not p.is_dir():
            raise NotAnImage(f"{label}: not a directory")
        return oci.load(DirBlobs(p), ref, label, platform)
    if not p.is_file():
        raise NotAnImage(f"{label}: no such file")
    blobs = TarBlobs(p)
    try:
        if transport == "oci-archive":
            return oci.load(blobs, ref, label, platform)
        return docker.load(blobs, ref, label)
    except BaseException:
        blobs.close()
        raise

"""What every image source yields: ordered layers plus the runtime part of the image config."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from lazyfs.errors import BuildOptionError

# The parts of an OCI image config a runtime needs; everything else (history, rootfs) stays out of
# the manifest so the same image gives the same manifest digest whatever archive form it came in.
RUNTIME_KEYS = ("Env", "Entrypoint", "Cmd", "WorkingDir", "User", "Labels", "StopSignal", "ExposedPorts")


@dataclass(frozen=True)
class DownloadLimits:
    """How a ``docker://`` download must progress to go on (docs/registry.md, "Slow and stalled
    downloads"). Time counts only while the build waits on the registry, so a build busy
    compressing what it already has is never mistaken for a slow registry."""
    stall: float = 30.0  # seconds without one byte, across resumes, before a download fails
    min_rate: int = 16 << 10  # bytes a second a download must average over each window (0: off)
    window: float = 60.0  # seconds

    def __post_init__(self) -> None:
        for option, ok in (("--stall-timeout", self.stall > 0), ("--rate-window", self.window > 0),
                           ("--min-rate", self.min_rate >= 0)):
            if not ok:
                raise BuildOptionError(f"{option} must be more than 0")


@dataclass(frozen=True)
class SourceOptions:
    """How to read a source: the platform to take from an index (every transport), and for
    ``docker://`` the credentials (``USER:PASS``, else the auth files), TLS verification and the
    download limits."""
    platform: str = ""  # "" means this machine's (imagebuilder.sources.oci.HOST_PLATFORM)
    creds: str | None = None
    tls_verify: bool = True
    limits: DownloadLimits = DownloadLimits()


@dataclass
class LayerRef:
    name: str
    open: Callable[[], BinaryIO]
    digest: str | None = None  # of the bytes as stored (possibly compressed)
    diff_id: str | None = None  # of the uncompressed tar
    size: int | None = None


@dataclass
class ImageInput:
    label: str
    layers: list[LayerRef] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    rootfs: Path | None = None  # set for dir: sources, which have no layers
    close: Callable[[], None] = lambda: None
    # Where it came from, for provenance (lazyfs/format/provenance.py): "ref", "manifest" (the
    # digest of the image manifest read), "index" (of the index it was chosen from), "platform".
    source: dict = field(default_factory=dict)


def runtime_config(config: dict) -> dict:
    inner = config.get("config") or {}
    if not isinstance(inner, dict):
        return {}
    out = {k: inner[k] for k in RUNTIME_KEYS if inner.get(k) not in (None, "", [], {})}
    for key in ("architecture", "os"):
        if isinstance(config.get(key), str):
            out[key] = config[key]
    return out

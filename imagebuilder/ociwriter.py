"""Write OCI image layouts from layer tars: used by `lazyfs demo` and to make test images.

This is a writer for images we make ourselves; lazyfs never needs it to read an image.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from imagebuilder.sources.oci import REF_NAME


@dataclass
class TarEntry:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    mode: int = 0o644
    linkname: str = ""
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    pax: dict = field(default_factory=dict)
    devmajor: int = 0
    devminor: int = 0


def make_tar(entries: list[TarEntry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type, info.mode, info.linkname = e.type, e.mode, e.linkname
            info.uid, info.gid, info.mtime = e.uid, e.gid, e.mtime
            info.pax_headers = dict(e.pax)
            info.devmajor, info.devminor = e.devmajor, e.devminor
            if e.type == tarfile.REGTYPE:
                info.size = len(e.data)
                tf.addfile(info, io.BytesIO(e.data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def _blob(root: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = root / "blobs" / "sha256" / digest[7:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def write_layout(root: Path, layers: list[bytes], tag: str = "latest", config: dict | None = None,
                 compress: bool = True, platform: str = "linux/amd64") -> Path:
    """An OCI layout at ``root`` with one image of ``layers`` (uncompressed tars) under ``tag``,
    its config saying ``platform`` (OS/ARCH[/VARIANT])."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    descs, diff_ids = [], []
    for tar in layers:
        diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        blob = gzip.compress(tar, mtime=0) if compress else tar
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
        descs.append({"mediaType": media, "digest": _blob(root, blob), "size": len(blob)})
    os_, arch, *variant = platform.split("/")
    cfg = {"architecture": arch, "os": os_, **({"variant": variant[0]} if variant else {}),
           "config": config or {}, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cfg_bytes = json.dumps(cfg).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": _blob(root, cfg_bytes), "size": len(cfg_bytes)},
                "layers": descs}
    m_bytes = json.dumps(manifest).encode()
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _blob(root, m_bytes),
        "size": len(m_bytes), "annotations": {REF_NAME: tag}}]}
    (root / "index.json").write_text(json.dumps(index))
    return root

"""The `pull` baseline: what a node does today before a container can start. Download the image's
manifest, config and compressed layers from a registry-like HTTP server (verifying each digest),
then unpack the layers in order onto local disk with umoci (whiteouts applied, as containerd
does), leaving a root filesystem to run from."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import LazyfsError

CHUNK = 1 << 20


class PullError(LazyfsError):
    pass


@dataclass
class PullResult:
    rootfs: Path
    download_s: float
    extract_s: float
    bytes: int  # compressed bytes downloaded (manifest, config, layers)
    requests: int


def _fetch(url: str, dest: Path | None, digest: str | None) -> bytes | int:
    h = hashlib.sha256()
    n = 0
    with urllib.request.urlopen(url, timeout=60) as resp:
        out = open(dest, "wb") if dest else None
        body = []
        try:
            while chunk := resp.read(CHUNK):
                h.update(chunk)
                n += len(chunk)
                (out.write(chunk) if out else body.append(chunk))
        finally:
            if out:
                out.close()
    if digest and "sha256:" + h.hexdigest() != digest:
        raise PullError(f"{url}: digest mismatch (got sha256:{h.hexdigest()})")
    return n if dest else b"".join(body)


def pull(base_url: str, tag: str, work: Path) -> PullResult:
    """Pull ``tag`` from an OCI layout served at base_url into work/ (emptied first)."""
    shutil.rmtree(work, ignore_errors=True)
    blobs = work / "layout" / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    t0 = time.monotonic()
    index = json.loads(_fetch(f"{base_url}/index.json", None, None))
    desc = next((m for m in index["manifests"]
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag), None)
    if desc is None:
        raise PullError(f"{base_url}: no image tagged {tag}")
    manifest_bytes = _fetch(f"{base_url}/blobs/sha256/{desc['digest'][7:]}", None, desc["digest"])
    (blobs / desc["digest"][7:]).write_bytes(manifest_bytes)
    manifest = json.loads(manifest_bytes)
    wanted = [manifest["config"], *manifest["layers"]]
    # Layers download in parallel, as docker and containerd do (3 at a time by default).
    with ThreadPoolExecutor(3) as pool:
        sizes = list(pool.map(lambda d: _fetch(f"{base_url}/blobs/sha256/{d['digest'][7:]}",
                                                blobs / d["digest"][7:], d["digest"]), wanted))
    (work / "layout" / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (work / "layout" / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    t1 = time.monotonic()
    proc = subprocess.run(["umoci", "unpack", "--image", f"{work / 'layout'}:{tag}", str(work / "bundle")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise PullError(f"umoci unpack failed: {proc.stderr.strip()[-500:]}")
    t2 = time.monotonic()
    return PullResult(work / "bundle" / "rootfs", t1 - t0, t2 - t1,
                      len(manifest_bytes) + sum(sizes), 2 + len(wanted))

"""A corpus of hostile and broken images, generated here (no checked-in binaries).

Each case makes an image source under a temp directory and says what `lazyfs build` must do with
it: refuse it with an error containing ``expect``, or accept it (``expect=None``) and pass ``check``
on the manifest. docs/security.md lists the same cases.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import zstandard

from imagebuilder.ociwriter import TarEntry, make_tar, write_layout
from lazyfs.format.manifest import EntryType, Manifest

DIR, SYM, LNK, CHR = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE
BASE = [TarEntry("etc/", type=DIR, mode=0o755), TarEntry("etc/hello", b"hello\n")]
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"


@dataclass
class Case:
    make: Callable[[Path], str]
    expect: str | None  # error text, or None when the image must be accepted
    check: Callable[[Manifest], None] | None = None
    args: tuple[str, ...] = ()


def _layers(t: Path, *layers: list[TarEntry]) -> str:
    return f"oci:{write_layout(t / 'img', [make_tar(BASE)] + [make_tar(l) for l in layers], 'v1')}:v1"


def _blob(root: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return digest


def _raw_layout(t: Path, layer: bytes, media: str = OCI_TAR + "+gzip", diff_id: str | None = None,
                config: bytes | None = None, manifest_media: str = "application/vnd.oci.image.manifest.v1+json",
                manifest_raw: bytes | None = None, layer_size: int | None = None) -> str:
    """An OCI layout whose blobs are exactly as given (digests in the index match them); the
    layer's descriptor says it is ``layer_size`` bytes when that is given."""
    root = t / "raw"
    root.mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    diff = diff_id or "sha256:" + hashlib.sha256(b"").hexdigest()
    cfg = config if config is not None else json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff]}}).encode()
    manifest = manifest_raw if manifest_raw is not None else json.dumps({
        "schemaVersion": 2, "mediaType": manifest_media,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _blob(root, cfg),
                   "size": len(cfg)},
        "layers": [{"mediaType": media, "digest": _blob(root, layer),
                    "size": len(layer) if layer_size is None else layer_size}]}).encode()
    index = {"schemaVersion": 2, "manifests": [{"mediaType": manifest_media, "digest": _blob(root, manifest),
                                                "size": len(manifest),
                                                "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
    (root / "index.json").write_text(json.dumps(index))
    return f"oci:{root}:v1"


def _good_tar() -> bytes:
    return make_tar(BASE + [TarEntry("big", bytes(range(256)) * 400)])


def _truncated_gzip(t: Path) -> str:
    blob = gzip.compress(_good_tar())
    return _raw_layout(t, blob[: len(blob) // 2])


def _truncated_zstd(t: Path) -> str:
    blob = zstandard.ZstdCompressor().compress(_good_tar())
    return _raw_layout(t, blob[: len(blob) // 2], OCI_TAR + "+zstd")


def _bomb(t: Path) -> str:
    tar = make_tar([TarEntry("zeros", bytes(50 << 20))])  # 50 MiB that gzip squeezes to ~50 KiB
    return _raw_layout(t, gzip.compress(tar, compresslevel=9), diff_id="sha256:" + hashlib.sha256(tar).hexdigest())


def _swapped_layer(t: Path) -> str:
    src = _layers(t, [TarEntry("x", b"original")])
    root = Path(src[4:].rsplit(":", 1)[0])
    index = json.loads((root / "index.json").read_text())
    m = json.loads((root / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    blob = root / "blobs/sha256" / m["layers"][1]["digest"][7:]
    # Another layer of the same size (gzip skips zero padding), so the digest is what catches it.
    evil = gzip.compress(make_tar([TarEntry("x", b"evil")]))
    assert len(evil) <= blob.stat().st_size
    blob.write_bytes(evil.ljust(blob.stat().st_size, b"\0"))
    return src


def _wrong_diff_id(t: Path) -> str:
    tar = _good_tar()
    return _raw_layout(t, gzip.compress(tar), diff_id="sha256:" + "0" * 64)


def _config_tampered(t: Path) -> str:
    src = _layers(t)
    root = Path(src[4:].rsplit(":", 1)[0])
    index = json.loads((root / "index.json").read_text())
    m = json.loads((root / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_text())
    cfg = root / "blobs/sha256" / m["config"]["digest"][7:]
    cfg.write_text(cfg.read_text().replace('"os": "linux"', '"os": "LINUX"'))  # same size
    return src


def _no_index(t: Path) -> str:
    src = _layers(t)
    Path(src[4:].rsplit(":", 1)[0], "index.json").unlink()
    return src


def _docker_missing_layer(t: Path) -> str:
    tar = make_tar(BASE)
    diff = "sha256:" + hashlib.sha256(tar).hexdigest()
    cfg = json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff]}, "config": {}}).encode()
    archive = t / "docker.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in (("config.json", cfg), ("manifest.json", json.dumps(
                [{"Config": "config.json", "RepoTags": ["x:1"], "Layers": ["abc/layer.tar"]}]).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return f"docker-archive:{archive}"


def _sparse(name: str, size: int, key: str = "GNU.sparse.size", kind: bytes = tarfile.REGTYPE) -> TarEntry:
    """An entry whose pax headers say it is ``size`` bytes of holes: no content in the stream."""
    return TarEntry(name, type=kind, pax={"GNU.sparse.map": "0,0", key: str(size), "GNU.sparse.name": name})


def _docker_manifest_loop(t: Path) -> str:
    archive = t / "docker.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("manifest.json")
        info.type, info.linkname = SYM, "manifest.json"
        tf.addfile(info)
    return f"docker-archive:{archive}"


def _deep_index(t: Path) -> str:
    src = _layers(t)
    Path(src[4:].rsplit(":", 1)[0], "index.json").write_bytes(b"[" * 100_000)
    return src


def _empty_file(t: Path) -> str:
    (t / "empty").write_bytes(b"")
    return str(t / "empty")


def _entries(m: Manifest) -> dict:
    return {e.path: e for e in m.entries}


def _check_devices(m: Manifest) -> None:
    e = _entries(m)
    assert e[b"dev/sda"].type == EntryType.CHR and e[b"dev/sda"].rdev == (8, 0)
    assert e[b"bin/su"].mode == 0o4755 and e[b"bin/su"].uid == 0


def _check_duplicate(m: Manifest) -> None:
    e = _entries(m)
    assert e[b"dup"].size == len(b"second")


def _check_non_utf8(m: Manifest) -> None:
    assert b"caf\xe9" in _entries(m) and b"\xff\xfe" in _entries(m)


def _check_whiteout_missing(m: Manifest) -> None:
    assert b"etc/hello" in _entries(m)


def _check_opaque_root(m: Manifest) -> None:
    # An opaque root hides every lower layer: only what this layer brings is left.
    assert sorted(_entries(m)) == [b"", b"fresh"], sorted(_entries(m))


def _check_many(m: Manifest) -> None:
    assert sum(p.startswith(b"many/") for p in _entries(m)) == 20_000


CORPUS: dict[str, Case] = {
    # --- refused: names that escape or cannot exist ----------------------------------------------
    "dotdot-entry": Case(lambda t: _layers(t, [TarEntry("etc/../../escape", b"x")]), "contains '..'"),
    "absolute-entry": Case(lambda t: _layers(t, [TarEntry("/etc/passwd", b"x")]), "is an absolute path"),
    "name-over-255-bytes": Case(lambda t: _layers(t, [TarEntry("a" * 256, b"x")]), "longer than 255"),
    "path-over-4096-bytes": Case(lambda t: _layers(t, [TarEntry("/".join(["d" * 200] * 21), b"x")]),
                                 "path longer than 4096"),
    "deep-nesting": Case(lambda t: _layers(t, [TarEntry("/".join(["d"] * 300), b"x")]), "deeper than 256"),
    "write-through-symlink": Case(lambda t: _layers(t, [TarEntry("evil", type=SYM, linkname="/etc"),
                                                        TarEntry("evil/passwd", b"pwned")]), "is a symlink"),
    "write-through-relative-symlink": Case(lambda t: _layers(t, [TarEntry("up", type=SYM, linkname="../../.."),
                                                                 TarEntry("up/root/x", b"x")]), "is a symlink"),
    "hardlink-outside": Case(lambda t: _layers(t, [TarEntry("etc/l", type=LNK, linkname="../../etc/shadow")]),
                             "entry 'etc/l': hardlink target '../../etc/shadow' contains '..'"),
    "hardlink-absolute": Case(lambda t: _layers(t, [TarEntry("etc/l", type=LNK, linkname="/etc/shadow")]),
                              "hardlink target '/etc/shadow' is an absolute path"),
    "hardlink-to-later-entry": Case(lambda t: _layers(t, [TarEntry("a", type=LNK, linkname="b"),
                                                          TarEntry("b", b"later")]), "not in the image"),
    "hardlink-to-directory": Case(lambda t: _layers(t, [TarEntry("l", type=LNK, linkname="etc")]),
                                  "hardlink to a directory"),
    "whiteout-as-directory": Case(lambda t: _layers(t, [TarEntry("etc/.wh.x/y", b"")]),
                                  "whiteout used as a directory"),
    "whiteout-of-dot": Case(lambda t: _layers(t, [TarEntry("etc/.wh..", b"")]), "names no file"),
    "unsupported-entry-type": Case(lambda t: _layers(t, [TarEntry("vol", type=b"V")]),
                                   "unsupported tar entry type"),
    # --- refused: damaged or lying archives -------------------------------------------------------
    "truncated-gzip-layer": Case(_truncated_gzip, "not a readable tar archive"),
    "truncated-zstd-layer": Case(_truncated_zstd, "not a readable tar archive"),
    "layer-digest-mismatch": Case(_swapped_layer, "hashes to"),
    "diff-id-mismatch": Case(_wrong_diff_id, "diff_id"),
    "layer-size-mismatch": Case(lambda t: _raw_layout(t, gzip.compress(_good_tar()), layer_size=10),
                                "its descriptor says 10 bytes"),
    "config-digest-mismatch": Case(_config_tampered, "hashes to"),
    "decompression-bomb-layer": Case(_bomb, "inflates past", args=("--max-size", "10M")),
    # Holes are charged to the one budget of every layer, and a negative size pays nothing back.
    "sparse-files-across-layers": Case(lambda t: _layers(t, [_sparse("s1", 8 << 20)], [_sparse("s2", 8 << 20)]),
                                       "beyond the limit", args=("--max-size", "10M")),
    "negative-sparse-size": Case(lambda t: _layers(t, [_sparse("d", -(64 << 20), "GNU.sparse.realsize", DIR),
                                                       _sparse("f", 64 << 20, "GNU.sparse.realsize")]),
                                 "negative size", args=("--max-size", "10M")),
    "index-nested-past-the-stack": Case(_deep_index, "not valid JSON"),
    "docker-archive-manifest-symlink-loop": Case(_docker_manifest_loop, "loop of symbolic links"),
    "config-not-json": Case(lambda t: _raw_layout(t, gzip.compress(_good_tar()), config=b"{not json"),
                            "not valid JSON"),
    "manifest-not-json": Case(lambda t: _raw_layout(t, b"", manifest_raw=b"\x00\x01garbage"), "not valid JSON"),
    "unknown-manifest-media-type": Case(lambda t: _raw_layout(t, gzip.compress(_good_tar()),
                                                              manifest_media="application/x-evil"),
                                        "unsupported manifest media type"),
    "unknown-layer-media-type": Case(lambda t: _raw_layout(t, gzip.compress(_good_tar()), media="text/plain"),
                                     "unsupported layer media type"),
    "whiteout-of-root": Case(lambda t: _layers(t, [TarEntry(".wh.", b"")]), "names no file"),
    "whiteout-name-with-slash": Case(lambda t: _layers(t, [TarEntry("etc/.wh./passwd", b"")]),
                                     "whiteout used as a directory"),
    "too-many-entries": Case(lambda t: _layers(t, [TarEntry(f"many/f{i}", b"") for i in range(2_000)]),
                             "more than 1000 entries", args=("--max-entries", "1000")),
    "missing-index": Case(_no_index, "index.json is missing"),
    "docker-archive-missing-layer": Case(_docker_missing_layer, "is missing"),
    "empty-file": Case(_empty_file, "not an image"),
    # --- accepted, with the right meaning ---------------------------------------------------------
    "device-nodes-and-setuid": Case(lambda t: _layers(t, [
        TarEntry("dev/", type=DIR, mode=0o755), TarEntry("dev/sda", type=CHR, mode=0o660, devmajor=8),
        TarEntry("bin/", type=DIR, mode=0o755), TarEntry("bin/su", b"#!/bin/sh\n", mode=0o4755)]),
        None, _check_devices),
    "duplicate-entries": Case(lambda t: _layers(t, [TarEntry("dup", b"first"), TarEntry("dup", b"second")]),
                              None, _check_duplicate),
    "whiteout-of-missing-path": Case(lambda t: _layers(t, [TarEntry("etc/.wh.nothing", b"")]), None,
                                     _check_whiteout_missing),
    "opaque-whiteout-of-root": Case(lambda t: _layers(t, [TarEntry(".wh..wh..opq", b""),
                                                          TarEntry("fresh", b"only this")]),
                                    None, _check_opaque_root),
    "many-entries-within-limits": Case(lambda t: _layers(t, [TarEntry(f"many/f{i}", b"") for i in range(20_000)]),
                                       None, _check_many, args=("--max-entries", "20100")),
    "non-utf8-names": Case(lambda t: _layers(t, [TarEntry("caf\udce9", b"latin-1 name"),
                                                 TarEntry("\udcff\udcfe", b"raw bytes")]), None, _check_non_utf8),
}

"""containerd's snapshots service, as Python gRPC stubs generated from the installed .proto files.

The protocol is containerd's, so its files are taken from containerd's own package (Debian's
golang-github-containerd-containerd-dev), never copied into this tree. Two edits make them
compile without the Go toolchain's gogoproto: its import and its options (Go code generation
hints: custom names, non-nullable fields) are dropped, and the mount type's import path is
flattened. Neither changes a message, a field number or a name on the wire.

`scripts/setup` generates the stubs at install time (``python -m lazyfs.snapshotter.proto``); a
snapshotter that finds none, or stubs of other .proto files, generates them at start.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from lazyfs.errors import SnapshotterUnavailable

API = Path(os.environ.get("LAZYFS_CONTAINERD_API",
                          "/usr/share/gocode/src/github.com/containerd/containerd/api"))
SOURCES = {"containerd_mount": "types/mount.proto",
           "containerd_snapshots": "services/snapshots/v1/snapshots.proto"}
GENERATED = Path(__file__).parent / "generated"
PACKAGE_HINT = "apt-get install golang-github-containerd-containerd-dev (containerd's .proto files)"

_GOGO_IMPORT = re.compile(r'^\s*import\s+(weak\s+)?"gogoproto/gogo\.proto";\s*$', re.M)
_GOGO_FILE_OPTION = re.compile(r"^\s*option\s+\(gogoproto\.[^;]*;\s*$", re.M)
_GOGO_FIELD_OPTIONS = re.compile(r"\s*\[\s*\(gogoproto\.[^\]]*\]")
_MOUNT_IMPORT = "github.com/containerd/containerd/api/types/mount.proto"


def _flatten(text: str) -> str:
    text = _GOGO_IMPORT.sub("", text)
    text = _GOGO_FILE_OPTION.sub("", text)
    text = _GOGO_FIELD_OPTIONS.sub("", text)
    return text.replace(_MOUNT_IMPORT, "containerd_mount.proto")


def _sources() -> dict[str, str]:
    out = {}
    for module, rel in SOURCES.items():
        path = API / rel
        try:
            out[module] = _flatten(path.read_text())
        except OSError:
            raise SnapshotterUnavailable(f"containerd's protocol file {path} is missing: {PACKAGE_HINT}") from None
    return out


def _fingerprint(sources: dict[str, str]) -> str:
    from grpc_tools import protoc
    h = hashlib.sha256(getattr(protoc, "__file__", "").encode())
    for module in sorted(sources):
        h.update(module.encode() + b"\0" + sources[module].encode() + b"\0")
    return h.hexdigest()[:16]


def generate(into: Path = GENERATED) -> Path:
    """Write the stubs into ``into`` (replacing what is there) unless they are current."""
    sources = _sources()
    stamp = _fingerprint(sources)
    if (into / "STAMP").is_file() and (into / "STAMP").read_text() == stamp:
        return into
    from grpc_tools import protoc
    import grpc_tools
    includes = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    into.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=into.parent, prefix=".proto-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        out.mkdir()
        for module, text in sources.items():
            (src / f"{module}.proto").write_text(text)
        args = ["protoc", f"-I{src}", f"-I{includes}", f"--python_out={out}", f"--grpc_python_out={out}",
                *[str(src / f"{m}.proto") for m in sources]]
        if protoc.main(args) != 0:
            raise SnapshotterUnavailable(f"protoc could not compile containerd's protocol files from {API}")
        (out / "STAMP").write_text(stamp)
        if into.exists():
            shutil.rmtree(into)
        os.replace(out, into)
    return into


def load():
    """(snapshots_pb2, snapshots_pb2_grpc, mount_pb2), generating the stubs if they are missing."""
    where = generate()
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))  # the generated modules import each other by bare name
    return (importlib.import_module("containerd_snapshots_pb2"),
            importlib.import_module("containerd_snapshots_pb2_grpc"),
            importlib.import_module("containerd_mount_pb2"))


if __name__ == "__main__":
    print(generate())

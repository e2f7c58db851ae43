"""Uniform read access to the files of an image, whether in a directory or inside a tar archive."""
from __future__ import annotations

import json
import posixpath
import tarfile
from pathlib import Path
from typing import BinaryIO

from lazyfs.errors import ImageSourceError, LayerDigestMismatch, NotAnImage
from lazyfs.format import digest as digests

MAX_JSON = 8 * 1024 * 1024


class BlobSource:
    """Files addressed by relative POSIX path. Subclasses: DirBlobs, TarBlobs."""

    label = ""

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def open(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def size(self, name: str) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def read_json(self, name: str, digest: str | None = None) -> dict | list:
        """Read a small JSON file; when ``digest`` is given, the bytes must hash to it."""
        if not self.exists(name):
            raise NotAnImage(f"{self.label}: {name} is missing")
        with self.open(name) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise ImageSourceError(f"{self.label}: {name} is larger than {MAX_JSON} bytes")
        if digest and digests.compute(data) != digest:
            raise LayerDigestMismatch(f"{self.label}: {name}", digest, digests.compute(data))
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ImageSourceError(f"{self.label}: {name} is not valid JSON ({exc})") from None

    @staticmethod
    def blob_path(digest: str) -> str:
        return "blobs/sha256/" + digests.hex_part(digest)


class DirBlobs(BlobSource):
    def __init__(self, root: Path):
        self.root = root
        self.label = str(root)

    def _path(self, name: str) -> Path:
        norm = posixpath.normpath(name)
        if norm.startswith(("/", "..")):
            raise ImageSourceError(f"{self.label}: refusing path {name!r} outside the image")
        return self.root / norm

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def open(self, name: str) -> BinaryIO:
        try:
            return open(self._path(name), "rb")
        except OSError as exc:
            raise ImageSourceError(f"{self.label}: cannot open {name}: {exc.strerror}") from None

    def size(self, name: str) -> int:
        return self._path(name).stat().st_size


class TarBlobs(BlobSource):
    def __init__(self, path: Path):
        self.label = str(path)
        try:
            self.tar = tarfile.open(path, mode="r:")
            members = self.tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise NotAnImage(f"{path}: not a readable tar archive ({exc})") from None
        self.members = {posixpath.normpath(m.name.lstrip("/")): m for m in members}

    def exists(self, name: str) -> bool:
        m = self.members.get(posixpath.normpath(name))
        return m is not None and (m.isfile() or m.issym() or m.islnk())

    def open(self, name: str) -> BinaryIO:
        member = self.members.get(posixpath.normpath(name))
        if member is None:
            raise NotAnImage(f"{self.label}: {name} is missing")
        try:
            f = self.tar.extractfile(member)
        except (tarfile.TarError, KeyError) as exc:
            raise ImageSourceError(f"{self.label}: cannot read {name} ({exc})") from None
        if f is None:
            raise ImageSourceError(f"{self.label}: {name} is not a file")
        return f

    def size(self, name: str) -> int:
        return self.members[posixpath.normpath(name)].size

    def close(self) -> None:
        self.tar.close()

"""Uniform read access to the files of an image, whether in a directory or inside a tar archive."""
from __future__ import annotations

import json
import posixpath
import tarfile
from pathlib import Path
from typing import BinaryIO

from lazyfs.errors import BlobSizeMismatch, ImageSourceError, LayerDigestMismatch, NotAnImage
from lazyfs.format import digest as digests
from lazyfs.format.guard import JSON_ERRORS

MAX_JSON = 8 * 1024 * 1024


class BlobSource:
    """Files addressed by relative POSIX path. Subclasses: DirBlobs, TarBlobs."""

    label = ""

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def open(self, name: str, size: int | None = None) -> BinaryIO:
        """A stream of the file. ``size``, the size a descriptor declares for it, is for sources
        that cannot tell a file's size before reading it (a registry): they hold the stream to it."""
        raise NotImplementedError

    def size(self, name: str) -> int | None:
        """The file's size, or None where it is not known before reading."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def check_size(self, what: str, name: str, digest: str, declared: int) -> None:
        """Refuse a blob whose size, where known before reading, is not what its descriptor says."""
        actual = self.size(name)
        if actual is not None and actual != declared:
            raise BlobSizeMismatch(f"{self.label}: {what}", digest, declared, f"the blob is {actual} bytes")

    def read_json(self, name: str, digest: str | None = None, size: int | None = None) -> dict | list:
        """Read a small JSON file; when ``digest`` is given, the bytes must hash to it, and when
        ``size`` is given (with it, from a descriptor), they must be that many."""
        if not self.exists(name):
            raise NotAnImage(f"{self.label}: {name} is missing")
        if size is not None:
            if size > MAX_JSON:
                raise ImageSourceError(f"{self.label}: {name}: its descriptor says {size} bytes, "
                                       f"more than the {MAX_JSON} a JSON document may have")
            self.check_size("blob", name, digest or name, size)
        with self.open(name, size) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise ImageSourceError(f"{self.label}: {name} is larger than {MAX_JSON} bytes")
        if size is not None and len(data) != size:
            raise BlobSizeMismatch(f"{self.label}: blob", digest or name, size, f"it holds {len(data)} bytes")
        if digest and digests.compute(data) != digest:
            raise LayerDigestMismatch(f"{self.label}: {name}", digest, digests.compute(data))
        try:
            return json.loads(data)
        except JSON_ERRORS as exc:
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

    def open(self, name: str, size: int | None = None) -> BinaryIO:
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

    def open(self, name: str, size: int | None = None) -> BinaryIO:
        member = self.members.get(posixpath.normpath(name))
        if member is None:
            raise NotAnImage(f"{self.label}: {name} is missing")
        try:
            f = self.tar.extractfile(member)
        except (tarfile.TarError, KeyError) as exc:
            raise ImageSourceError(f"{self.label}: cannot read {name} ({exc})") from None
        except RecursionError:  # tarfile follows a member's links by recursion, loops included
            raise ImageSourceError(f"{self.label}: {name} is a loop of symbolic links") from None
        if f is None:
            raise ImageSourceError(f"{self.label}: {name} is not a file")
        return f

    def size(self, name: str) -> int:
        return self.members[posixpath.normpath(name)].size

    def close(self) -> None:
        self.tar.close()

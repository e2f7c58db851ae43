"""Image references: ``NAME[:TAG]``, ``NAME@sha256:HEX`` or a bare ``sha256:HEX`` manifest digest."""
from __future__ import annotations

import re
from dataclasses import dataclass

from lazyfs.errors import InvalidReference
from lazyfs.format import digest as digests

# The OCI distribution grammar for repository names, without a registry host (lazyfs stores are
# named by --store, not by the reference).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")  # \Z: "$" lets a final newline in
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
MAX_NAME = 255
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class Reference:
    name: str | None
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        if self.name is None:
            return self.digest or ""
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag}"


def parse(text: str) -> Reference:
    if digests.is_valid(text):
        return Reference(None, None, text)
    name, at, dig = text.partition("@")
    if at:
        if not digests.is_valid(dig):
            raise InvalidReference(f"invalid digest in reference {text!r}")
        return Reference(_check_name(name, text), None, dig)
    name, colon, tag = text.rpartition(":")
    if not colon:
        name, tag = text, DEFAULT_TAG
    if not TAG_RE.match(tag):
        raise InvalidReference(f"invalid tag {tag!r} in {text!r}: use letters, digits, '_', '.', '-'")
    return Reference(_check_name(name, text), tag, None)


def parse_tagged(text: str) -> Reference:
    """A reference that names a tag to write (``build --tag``): digests are not allowed here."""
    ref = parse(text)
    if ref.tag is None:
        raise InvalidReference(f"{text!r}: --tag needs NAME[:TAG], not a digest")
    return ref


def _check_name(name: str, text: str) -> str:
    if len(name) > MAX_NAME or not NAME_RE.match(name):
        raise InvalidReference(
            f"invalid image name {name!r} in {text!r}: lowercase letters, digits and separators "
            "('.', '_', '-', '/') as in OCI repository names")
    return name

"""``docker://`` references, spelled as skopeo and podman spell them. Pure: no I/O.

``docker://HOST[:PORT]/REPO[:TAG][@sha256:HEX]``. As in docker, a first component with no ``.``
or ``:`` that is not ``localhost`` is a Docker Hub repository (``docker://alpine`` is
``docker.io/library/alpine:latest``); a digest wins over a tag when both are given.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from lazyfs.errors import InvalidReference
from lazyfs.format import digest as digests
from lazyfs.format.reference import DEFAULT_TAG, MAX_NAME, NAME_RE, TAG_RE

PREFIX = "docker://"
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"  # where docker.io's registry API is served
# A host as the distribution grammar allows it: DNS labels or an IPv4/[IPv6] address, then a port.
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                      r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


@dataclass(frozen=True)
class DockerRef:
    host: str  # as written, with its port: "127.0.0.1:5000", "ghcr.io", "docker.io"
    repo: str  # "team/app", "library/alpine"
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    @property
    def reference(self) -> str:
        """What to ask /v2/REPO/manifests/ for: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        pinned = f"@{self.digest}" if self.digest else ""
        tag = f":{self.tag}" if self.tag and not self.digest else ""
        return f"{self.host}/{self.repo}{tag}{pinned}"


def is_docker(spec: str) -> bool:
    return spec.startswith(PREFIX)


def parse(spec: str) -> DockerRef:
    """``docker://…`` (the prefix is optional here) → DockerRef; InvalidReference says what is wrong."""
    text = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    if not text or text != text.strip():
        raise InvalidReference(f"{spec!r}: expected docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]")
    rest, at, digest = text.partition("@")
    if at and not digests.is_valid(digest):
        raise InvalidReference(f"{spec}: invalid digest {digest!r} (expected sha256:<64 hex digits>)")
    first, slash, path = rest.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost"):
        first, path = DOCKER_HUB, rest  # docker's rule: no host part means Docker Hub
    if not _HOST_RE.match(first):
        raise InvalidReference(f"{spec}: invalid registry host {first!r}")
    repo, tag = path, None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        repo, _, tag = path.rpartition(":")
        if not TAG_RE.match(tag):
            raise InvalidReference(f"{spec}: invalid tag {tag!r}: use letters, digits, '_', '.', '-'")
    if first == DOCKER_HUB and "/" not in repo:
        repo = "library/" + repo
    if not NAME_RE.match(repo) or len(repo) > MAX_NAME:
        raise InvalidReference(f"{spec}: invalid repository name {repo!r} (lowercase letters, digits "
                               "and separators, components joined by '/')")
    return DockerRef(first, repo, None if at and not tag else (tag or DEFAULT_TAG), digest or None)

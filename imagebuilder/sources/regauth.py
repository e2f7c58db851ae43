"""Registry credentials as docker and podman users already have them, and the auth challenge.

Where credentials come from, first match wins (podman's order, then docker's):

1. ``--creds USER:PASS``;
2. ``$REGISTRY_AUTH_FILE``;
3. ``$XDG_RUNTIME_DIR/containers/auth.json``;
4. ``~/.config/containers/auth.json``;
5. ``~/.docker/config.json``.

Each file is ``{"auths": {KEY: {"auth": base64("USER:PASS")}}}``. KEY is a host (``reg:5000``), a
URL (``https://reg:5000/v1/``) or, in podman's files, a host and repository path
(``reg:5000/team``): the longest key that matches the repository wins within a file. Credential
helpers (``credsStore``, ``credHelpers``) are not run.
"""
from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import RegistryAuthError

DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str  # where they came from, for error messages: "--creds" or a file path

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def from_creds(text: str) -> Credentials:
    user, colon, password = text.partition(":")
    if not colon or not user:
        raise RegistryAuthError("--creds must be USER:PASS")
    return Credentials(user, password, "--creds")


def auth_files(env: dict | None = None) -> list[Path]:
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    if env.get("REGISTRY_AUTH_FILE"):
        return [Path(env["REGISTRY_AUTH_FILE"])]  # podman: when set, it is the only file
    out = []
    if env.get("XDG_RUNTIME_DIR"):
        out.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    out += [home / ".config" / "containers" / "auth.json", home / ".docker" / "config.json"]
    return out


def _normalize_key(key: str) -> str:
    key = re.sub(r"^[a-z]+://", "", key.strip()).rstrip("/")
    return re.sub(r"/v[12]$", "", key)


def _matches(key: str, host: str, repo: str) -> bool:
    if key in DOCKER_HUB_KEYS and host == "docker.io":
        return True
    key_host, _, key_path = key.partition("/")
    if key_host != host:
        return False
    return not key_path or repo == key_path or repo.startswith(key_path + "/")


def lookup(host: str, repo: str, env: dict | None = None) -> Credentials | None:
    """The credentials the auth files hold for ``host``/``repo``, or None."""
    for path in auth_files(env):
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            raise RegistryAuthError(f"{path}: unreadable auth file ({exc})") from None
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            continue
        found = sorted((k for k in auths if _matches(_normalize_key(k), host, repo)),
                       key=lambda k: len(_normalize_key(k)), reverse=True)
        for key in found:
            entry = auths[key]
            if isinstance(entry, dict) and entry.get("auth"):
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    raise RegistryAuthError(f"{path}: auths[{key!r}].auth is not base64 of USER:PASS") from None
                return Credentials(user, password, str(path))
    return None


_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="…"`` → ("bearer", {...}); ("basic", {...}) likewise."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for m in _PARAM.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params

"""Who may do what on a cache server (docs/protocol.md §2): writes need the write token; reads,
with --auth-reads, the write token or the node token; a node's startup profile contribution the
node token where the server has one (cache_server.profiles). Tokens are compared in constant time."""
from __future__ import annotations

import hmac

from aiohttp import web

from cache_server.requests import HttpError


class Auth:
    def __init__(self, config) -> None:
        self.config = config  # cache_server.app.ServerConfig

    def write(self, request: web.Request) -> None:
        if self.config.token is None:
            raise HttpError(403, "writes are disabled on this server (start it with --token-file)")
        _bearer(request, (self.config.token,))

    def read(self, request: web.Request) -> None:
        if self.config.auth_reads:
            _bearer(request, self._node_tokens())

    def node(self, request: web.Request) -> None:
        """What a node may do beyond reading (contribute a startup profile): on a server whose
        reads are open and that has no node token, whoever may read; else the node token (or
        the write token)."""
        if not self.config.profiles:
            raise HttpError(403, "this server takes no startup profiles (started with --no-profiles)")
        if self.config.node_token is None and not self.config.auth_reads:
            return
        _bearer(request, self._node_tokens())

    def _node_tokens(self) -> tuple[str, ...]:
        return tuple(t for t in (self.config.node_token, self.config.token) if t)


def _bearer(request: web.Request, accepted: tuple[str, ...]) -> None:
    if not accepted:
        raise HttpError(403, "this server has no token to check (start it with --token-file)")
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        raise HttpError(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
    # Header values arrive decoded with surrogateescape: any bytes, even ones no token has.
    sent = header[7:].strip().encode("utf-8", "surrogateescape")
    if not any([hmac.compare_digest(sent, t.encode()) for t in accepted]):  # all compared: no early exit
        raise HttpError(403, "wrong token")

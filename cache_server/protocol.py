"""The cache server's connections: aiohttp's HTTP protocol with the limits a server on a shared
network needs, which aiohttp itself does not have.

- **Slow or idle clients.** A connection must deliver each request's headers within
  ``header_timeout`` of connecting or of its previous answer, else it is closed: aiohttp waits
  forever for the first request, so a client that sends half a request line would hold its
  descriptor for good. (Bodies have their own timeout where handlers read them.)
- **Clients that never read.** aiohttp has no timeout on sending an answer, so each connection
  gets TCP_USER_TIMEOUT (``send_timeout``): the kernel closes one whose client has taken none of
  its bytes for that long (zero-window probes included), and the answer's cache file is let go.
- **A connection limit below the descriptor limit.** Past ``max_connections`` a new connection
  first evicts the oldest one still waiting for its headers (a slow client loses its place, a
  health check gets in); only when every connection is busy with a request does it get a
  ``503`` with ``Retry-After`` and is closed at once, never left to hit "Too many open files".
- **Errors aiohttp answers itself** (unparseable request lines and headers, oversized ones) get
  the same JSON body as every other error, a status-only message that never echoes request
  bytes (a malformed ``Authorization`` header would otherwise come back, token and all), and an
  access-log line like every other request.

aiohttp 3.13 (pinned) builds one RequestHandler per connection through its web.Server; GuardedRunner
makes that server build GuardedHandlers instead.
"""
from __future__ import annotations

import json
import logging
import resource
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from cache_server.requests import error_response

log = logging.getLogger("lazyfs.server")
HEADER_TIMEOUT = 10.0  # seconds for a request's headers to arrive
SEND_TIMEOUT = 60.0  # seconds a client may take none of an answer's bytes (TCP_USER_TIMEOUT)
MAX_CONNECTIONS = 1024
# After refusing a body (413), read and drop what the client still sends for this long, so it
# gets to read the answer instead of a reset; dropped bytes cost no memory.
LINGER = 1.0


# asyncio accepts up to the listen backlog in one go, and may do so twice before a connection
# over the limit is closed: the descriptors for two such bursts, and for cache files, origin
# connections and the log, stay free of client connections.
RESERVED_FDS = 64


def _soft_nofile() -> int | None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def listen_backlog() -> int:
    """aiohttp's 128, or less under a small descriptor limit."""
    soft = _soft_nofile()
    return 128 if soft is None else max(8, min(128, soft // 8))


def default_max_connections() -> int:
    """MAX_CONNECTIONS, or what the descriptor limit leaves if that is lower."""
    soft = _soft_nofile()
    if soft is None:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft - 2 * listen_backlog() - RESERVED_FDS))


def _busy_answer() -> bytes:
    body = json.dumps({"error": "server busy: too many connections; retry shortly"}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


BUSY = _busy_answer()


@dataclass
class Guard:
    """Shared by a server's connections: the limits, and who is waiting for headers."""
    max_connections: int = field(default_factory=default_max_connections)
    header_timeout: float = HEADER_TIMEOUT
    send_timeout: float = SEND_TIMEOUT
    server: object | None = None  # the CacheServer, for the access log's metrics
    open: int = 0
    refused: int = 0  # connections answered 503 at the limit
    evicted: int = 0  # waiting connections closed to make room
    timed_out: int = 0  # connections closed for not sending headers in time
    waiting: "OrderedDict[GuardedHandler, float]" = field(default_factory=OrderedDict)

    def make_room(self) -> bool:
        """Close the connection that has waited longest for headers; False if none waits."""
        if not self.waiting:
            return False
        handler, _ = self.waiting.popitem(last=False)
        self.evicted += 1
        handler.force_close()
        return True


class GuardedHandler(RequestHandler):
    def __init__(self, manager, *, guard: Guard, **kwargs):
        super().__init__(manager, **kwargs)
        self.guard = guard
        self._counted = False
        self._header_timer = None

    def connection_made(self, transport) -> None:
        g = self.guard
        if g.open >= g.max_connections and not g.make_room():
            g.refused += 1
            transport.write(BUSY)
            transport.close()
            return
        g.open += 1
        self._counted = True
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and g.send_timeout > 0:
            # aiohttp has no timeout on sending an answer: a client that never reads (its window
            # shut) would hold this connection, and pin the cache file it is sent from, for good.
            # The kernel gives up on data unacknowledged this long, zero-window probes included.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(g.send_timeout * 1000))
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc) -> None:
        if not self._counted:
            return  # refused at the limit: aiohttp never saw this connection
        self._counted = False
        self.guard.open -= 1
        self._headers_arrived()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._headers_arrived()

    def log_access(self, request, response, time_) -> None:
        super().log_access(request, response, time_)
        if self._counted and not self._force_close:
            self._await_headers()  # kept alive: the next request's headers are due in time

    def _await_headers(self) -> None:
        self._headers_arrived()
        g = self.guard
        g.waiting[self] = time.monotonic()
        self._header_timer = self._loop.call_later(g.header_timeout, self._too_slow)

    def _headers_arrived(self) -> None:
        self.guard.waiting.pop(self, None)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if self.guard.waiting.pop(self, None) is not None:
            self.guard.timed_out += 1
            self.force_close()

    def handle_error(self, request, status: int = 500, exc=None, message=None):
        """aiohttp's own error answers, as JSON, without echoing request bytes."""
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.debug("unparseable request from %s: %s", request.remote, type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already under way; the connection is closed")
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
        what = "internal error" if status >= 500 else "the request could not be parsed"
        resp = error_response(status, f"{status} {phrase}: {what}")
        resp.force_close()
        return resp


class _GuardedServer(web.Server):
    guard: Guard

    def __call__(self) -> RequestHandler:
        return GuardedHandler(self, loop=self._loop, guard=self.guard, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """web.AppRunner whose connections are GuardedHandlers."""

    def __init__(self, app: web.Application, guard: Guard, **kwargs):
        kwargs.setdefault("lingering_time", LINGER)
        # Never inflate a request body (Content-Encoding: gzip/deflate): aiohttp would, as it
        # arrives and without a bound, before any handler could look at a limit or a token.
        kwargs.setdefault("auto_decompress", False)
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer  # same object, one method more: its handler factory
        server.guard = self.guard
        return server

"""Running a cache server: in the foreground (`lazyfs serve`) or on a thread (tests, benchmarks)."""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cache_server.app import AccessLog, CacheServer, ServerConfig
from cache_server.diskcache import DiskCache
from cache_server.protocol import Guard, GuardedRunner, listen_backlog
from lazyfs.errors import LazyfsError
from lazyfs.store.base import BlockStore

access_log = logging.getLogger("lazyfs.server.access")


@dataclass
class ServeOptions:
    host: str
    port: int
    cache_dir: Path
    cache_size: int
    config: ServerConfig
    access_log: bool = True
    guard: Guard | None = None  # connection limits (cache_server/protocol.py); None: defaults


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise LazyfsError(f"--listen wants HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def make_server(origin: BlockStore, opts: ServeOptions) -> CacheServer:
    return CacheServer(origin, DiskCache(opts.cache_dir, opts.cache_size), opts.config)


def serve_forever(origin: BlockStore, opts: ServeOptions) -> None:
    """Serve until SIGINT or SIGTERM, then close connections within 5 s."""
    # The access logger also feeds the request metrics, so it always runs; --no-access-log only
    # raises its level.
    access_log.setLevel(logging.INFO if opts.access_log else logging.WARNING)
    asyncio.run(_serve(make_server(origin, opts), opts))


async def _serve(server: CacheServer, opts: ServeOptions) -> None:
    runner = start_runner(server, opts, access_log)
    await runner.setup()
    await web.TCPSite(runner, opts.host, opts.port, shutdown_timeout=5,
                      backlog=listen_backlog()).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def start_runner(server: CacheServer, opts: ServeOptions, logger: logging.Logger) -> GuardedRunner:
    guard = opts.guard or Guard()
    guard.server = server
    return GuardedRunner(server.app(), guard, access_log=logger, access_log_class=AccessLog)


class ServerThread:
    """A real server on 127.0.0.1 on a background thread: `with ServerThread(...) as url:`."""

    def __init__(self, origin: BlockStore, cache_dir: Path, cache_size: int = 1 << 30,
                 config: ServerConfig | None = None, guard: Guard | None = None):
        self.opts = ServeOptions("127.0.0.1", 0, Path(cache_dir), cache_size, config or ServerConfig(),
                                 access_log=False, guard=guard)
        self.origin = origin
        self.server: CacheServer | None = None
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: GuardedRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="cache-server", daemon=True)

    def start(self) -> "ServerThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    async def _start(self) -> None:
        self.server = make_server(self.origin, self.opts)
        quiet = logging.getLogger("lazyfs.server.access.thread")
        quiet.setLevel(logging.WARNING)
        self._runner = start_runner(self.server, self.opts, quiet)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=listen_backlog())
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._runner:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

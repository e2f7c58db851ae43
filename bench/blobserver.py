"""A static file server for the pull baseline: what a registry does for `docker pull`, on the same
link and with the same per-request latency as the cache server (``--delay``).

    python -m bench.blobserver DIR --port PORT [--delay 1ms]
"""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aiohttp import web


def make_app(root: Path, delay: float) -> web.Application:
    root = root.resolve()

    async def get(request: web.Request) -> web.StreamResponse:
        path = (root / request.match_info["path"]).resolve()
        if root not in path.parents or not path.is_file():
            raise web.HTTPNotFound()
        if delay:
            await asyncio.sleep(delay)
        return web.FileResponse(path)
    app = web.Application()
    app.router.add_get("/{path:.+}", get)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.0, help="seconds added per request")
    a = p.parse_args()
    web.run_app(make_app(a.dir, a.delay), host="127.0.0.1", port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    main()

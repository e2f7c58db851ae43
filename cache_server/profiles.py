"""The route nodes hand startup profiles to: ``POST /v1/profiles/{image}`` (docs/protocol.md).

A node records what a cold start of an image read and contributes it here; the server merges it
into the store's profile of that image and workload (lazyfs.records.profiles.contribute) with its own
write access to the origin, so nodes never hold the store's write token. What a contribution can
do is bounded: only blocks of an image the origin has count, with the sizes its manifest gives,
at most MAX_CONTRIBUTION of them, merged into a profile of bounded size. A contribution of one
image and workload waits for the one before it, so merges on one server do not lose each other.
"""
from __future__ import annotations

import asyncio

from aiohttp import web

from cache_server.requests import HttpError
from lazyfs.records import objects, profiles
from lazyfs.errors import FormatError
from lazyfs.format import manifest as mf
from lazyfs.format import profile as proffmt

# A contribution's body: MAX_CONTRIBUTION entries of about 90 bytes, and its meta.
PROFILE_BODY = 8 * 1024 * 1024


class ProfileMerges:
    def __init__(self, server) -> None:
        self.server = server  # cache_server.app.CacheServer: its origin, cache, filler, bodies
        self._merging: dict[tuple, list] = {}  # (image, workload) -> [lock, users]

    async def contribute(self, request: web.Request) -> web.Response:
        server = self.server
        try:
            server.auth.node(request)
        except HttpError:
            server.metrics.profiles.labels("refused").inc()
            raise
        image = server._digest(request)
        workload = request.query.get("workload")
        try:
            if workload is not None:
                proffmt.check_workload(workload)
            start = proffmt.decode(await server.bodies.read(request, PROFILE_BODY))
        except FormatError as exc:
            server.metrics.profiles.labels("refused").inc()
            raise HttpError(400, f"not a startup profile: {exc}") from None
        if start.image != image:
            server.metrics.profiles.labels("refused").inc()
            raise HttpError(400, f"the profile is of {start.image}, not {image}")
        if len(start.blocks) > proffmt.MAX_CONTRIBUTION:
            server.metrics.profiles.labels("refused").inc()
            raise HttpError(400, f"a start contributes at most {proffmt.MAX_CONTRIBUTION} blocks, "
                                 f"not {len(start.blocks)}")
        manifest = await self._manifest(image)  # NotFound: 404, no such image
        key = (image, workload)
        entry = self._merging.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                result = await server.filler.call(profiles.contribute, server.origin, manifest,
                                                  image, start, workload)
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._merging[key]
        server.metrics.profiles.labels("merged").inc()
        return web.json_response(result, status=201)

    async def _manifest(self, image: str) -> mf.Manifest:
        """The image's manifest, verified, through the disk cache (nodes just read it)."""
        server = self.server
        path, frame = await server.filler.obtain("manifests", image)
        if frame is None:
            try:
                frame = await server.filler.read(path)
            finally:
                server.cache.unpin("manifests", image)
        return await server.filler.call(_decode, image, frame)


def _decode(image: str, frame: bytes) -> mf.Manifest:
    return mf.decode(objects.verify(objects.MANIFEST, image, frame))

"""The cache server's HTTP routes (docs/protocol.md): blocks, manifests, tags, leases, metrics.

Reads are answered from the disk cache (sendfile) or filled from the origin store; writes go
through to the origin after their digest checks out and need the bearer token.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cache_server import batches
from cache_server.auth import Auth
from cache_server.diskcache import DiskCache
from cache_server.filler import Filler, verify
from cache_server.metrics import Metrics
from cache_server.profiles import ProfileMerges
from cache_server.requests import (BATCH_BODY, LEASE_BODY, TAG_BODY, Bodies, HttpError,
                                   byte_range, climbs, error_response)
from lazyfs.errors import FormatError, IntegrityError, LazyfsError, NotCached, NotFound, StoreError
from lazyfs.format import batch, reference
from lazyfs.format import digest as digests
from lazyfs.format.block import MAX_FRAME_SIZE
from lazyfs.format.guard import JSON_ERRORS
from lazyfs.store import lease
from lazyfs.store.base import BlockStore
from lazyfs.format.manifest import MAX_MANIFEST_FRAME

log = logging.getLogger("lazyfs.server")
OCTETS = "application/octet-stream"
IMMUTABLE = "public, max-age=31536000, immutable"
KIND_LIMIT = {"blocks": MAX_FRAME_SIZE, "manifests": MAX_MANIFEST_FRAME}


@dataclass
class ServerConfig:
    token: str | None = None  # None: writes are refused
    auth_reads: bool = False
    # Nodes' credential: reads (with auth_reads) and startup profile contributions, never writes.
    node_token: str | None = None
    profiles: bool = True  # take startup profiles from nodes (cache_server.profiles)
    delay: float = 0.0  # added before answering data requests (emulated network latency)


class _CacheFile(web.FileResponse):
    """A cached frame sent with sendfile(2); the entry stays pinned (not evicted) until sent."""

    def __init__(self, path: str, release, **kwargs):
        super().__init__(path, **kwargs)
        self._release = release

    @property
    def etag(self):
        return web.StreamResponse.etag.fget(self)

    @etag.setter
    def etag(self, value) -> None:
        # aiohttp names the file by its mtime and size, which change when the entry is verified
        # again; an object's ETag is its digest, cached or not (set when this was made).
        if "ETag" not in self.headers:
            web.StreamResponse.etag.fset(self, value)

    async def prepare(self, request):
        try:
            return await super().prepare(request)
        finally:
            release, self._release = self._release, None
            if release:
                release()


def _conditional(request: web.Request) -> bool:
    return any(h in request.headers for h in ("If-Match", "If-None-Match", "If-Modified-Since",
                                              "If-Unmodified-Since", "If-Range"))


class AccessLog(AbstractAccessLogger):
    """Per-request metrics, and (when its logger is at INFO) one JSON line per request."""

    def log(self, request, response, time):  # noqa: A002 - aiohttp's signature
        # Requests aiohttp could not parse come as a bare BaseRequest (no app, no route): they
        # are logged and counted too, under the route "unparsed".
        guard = getattr(getattr(request, "protocol", None), "guard", None)
        server = getattr(guard, "server", None)
        if server is not None:
            server.record(request, response, time)
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(json.dumps({
                "remote": request.remote, "method": request.method, "path": request.path,
                "status": response.status, "bytes": _body_bytes(request, response),
                "ms": round(time * 1000, 3), "range": request.headers.get("Range")}))


class CacheServer:
    def __init__(self, origin: BlockStore, cache: DiskCache, config: ServerConfig):
        self.origin, self.cache, self.config = origin, cache, config
        self.metrics = Metrics()
        self.metrics.cache_capacity.set(cache.capacity)
        self.metrics.cache_state(cache)
        self.filler = Filler(origin, cache, self.metrics)
        self.bodies = Bodies()
        self.profiles = ProfileMerges(self)
        self.auth = Auth(config)

    # -- plumbing ------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=KIND_LIMIT["manifests"])
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.metrics_page)
        r.add_post("/v1/blocks/batch", self.get_batch)
        for kind in ("blocks", "manifests"):
            r.add_route("HEAD", f"/v1/{kind}/{{digest}}", self._bind(self.head_object, kind))
            r.add_get(f"/v1/{kind}/{{digest}}", self._bind(self.get_object, kind), allow_head=False)
            r.add_put(f"/v1/{kind}/{{digest}}", self._bind(self.put_object, kind))
            r.add_delete(f"/v1/{kind}/{{digest}}", self._bind(self.delete_object, kind))
            r.add_get(f"/v1/{kind}", self._bind(self.list_objects, kind))
        r.add_get("/v1/tags", self.list_tags)
        r.add_get("/v1/tags/{ref:.+}", self.get_tag)
        r.add_put("/v1/tags/{ref:.+}", self.put_tag)
        r.add_post("/v1/profiles/{digest}", self.profiles.contribute)
        r.add_get("/v1/leases", self.list_leases)
        r.add_put("/v1/leases/{name}", self.put_lease)
        r.add_delete("/v1/leases/{name}", self.delete_lease)
        app.on_cleanup.append(self._cleanup)
        return app

    @staticmethod
    def _bind(handler, kind):
        async def bound(request):
            return await handler(request, kind)
        return bound

    async def _cleanup(self, app) -> None:
        self.filler.close()
        self.cache.close()

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        """Typed errors become JSON answers with the right status (metrics: see AccessLog)."""
        try:
            if climbs(request.raw_path):
                raise HttpError(400, "path segments '.' and '..' are refused")
            return await handler(request)
        except HttpError as exc:
            resp = error_response(exc.status, str(exc), exc.headers)
            if exc.close:
                resp.force_close()
            return resp
        except NotFound as exc:
            return error_response(404, str(exc))
        except (IntegrityError, FormatError) as exc:  # the origin holds bad bytes
            return error_response(502, f"origin: {exc}")
        except LazyfsError as exc:  # origin unreachable, refused, ...
            return error_response(502, f"origin: {exc}")

    def record(self, request: web.BaseRequest, response: web.StreamResponse, seconds: float) -> None:
        """Called once per answered request, after its body went out."""
        try:
            info = request.match_info
        except (AttributeError, AssertionError):  # aiohttp answered before routing (a parse error)
            info = None
        resource = info.route.resource if info is not None else None
        route = resource.canonical if resource is not None else (
            "unmatched" if info is not None else "unparsed")
        self.metrics.requests.labels(route, request.method, str(response.status)).inc()
        self.metrics.latency.labels(route).observe(seconds)
        self.metrics.response_bytes.labels(route).inc(_body_bytes(request, response))

    @staticmethod
    def _digest(request: web.Request) -> str:
        value = request.match_info["digest"]
        if not digests.is_valid(value):
            raise HttpError(400, f"not a sha256 digest: {value[:100]!r}")
        return value

    async def _delay(self) -> None:
        if self.config.delay:
            await asyncio.sleep(self.config.delay)

    # -- reads ---------------------------------------------------------------------------------
    async def get_object(self, request: web.Request, kind: str) -> web.StreamResponse:
        self.auth.read(request)
        digest = self._digest(request)
        await self._delay()
        # RFC 9111: answer from the cache or 504; never fill from the origin for this.
        cache_only = "only-if-cached" in request.headers.get("Cache-Control", "")
        try:
            path, frame = await self.filler.obtain(kind, digest, fill=not cache_only)
        except NotCached:
            raise HttpError(504, "not cached here (only-if-cached)") from None
        headers = {"Content-Type": OCTETS, "Cache-Control": IMMUTABLE, "ETag": f'"{digest}"'}
        if frame is None and _conditional(request):
            # aiohttp's sendfile answer would judge If-Match and the like by the file's mtime
            # and size; an object is the same whatever they ask: answered as one in hand is.
            try:
                frame = await self.filler.read(path)
            finally:
                self.cache.unpin(kind, digest)
        if frame is None:  # pinned in the cache: sendfile, then unpin
            try:
                byte_range(request.headers.get("Range"), self.cache.size(kind, digest))
            except HttpError:
                self.cache.unpin(kind, digest)
                raise
            return _CacheFile(path, lambda: self.cache.unpin(kind, digest), headers=headers)
        rng = byte_range(request.headers.get("Range"), len(frame))  # too big for the cache
        if rng is None:
            return web.Response(body=frame, headers=headers)
        start, stop = rng
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(frame)}"
        return web.Response(body=frame[start:stop], status=206, headers=headers)

    async def head_object(self, request: web.Request, kind: str) -> web.Response:
        self.auth.read(request)
        digest = self._digest(request)
        # no-cache: the origin's word (a build deciding whether to upload: lazyfs.store.http)
        fresh = kind == "blocks" and "no-cache" in request.headers.get("Cache-Control", "")
        size = None if fresh else self.cache.size(kind, digest)
        if size is not None:
            pass
        elif kind == "blocks":
            size = await self.filler.call(self.origin.block_size, digest)
            if size is None:
                raise NotFound(f"block {digest} not found")
        else:
            path, frame = await self.filler.obtain(kind, digest)
            if path is not None:
                size = self.cache.size(kind, digest)
                self.cache.unpin(kind, digest)
            else:
                size = len(frame)
        return web.Response(headers={"Content-Type": OCTETS, "Content-Length": str(size),
                                     "Accept-Ranges": "bytes"})

    async def get_batch(self, request: web.Request) -> web.StreamResponse:
        self.auth.read(request)
        raw = await self.bodies.read(request, BATCH_BODY)
        try:
            body = json.loads(raw)
        except JSON_ERRORS:
            body = None
        wanted = body.get("digests") if isinstance(body, dict) else None
        if not isinstance(wanted, list) or not all(isinstance(d, str) for d in wanted):
            raise HttpError(400, 'body must be JSON {"digests": ["sha256:...", ...]}')
        if len(wanted) > batch.MAX_DIGESTS:
            raise HttpError(413, f"at most {batch.MAX_DIGESTS} digests per batch")
        bad = [d for d in wanted if not digests.is_valid(d)]
        if bad:
            raise HttpError(400, f"not a sha256 digest: {bad[0][:100]!r}")
        await self._delay()
        return await batches.answer(request, wanted, self.filler, self.cache)

    async def list_objects(self, request: web.Request, kind: str) -> web.StreamResponse:
        self.auth.read(request)
        lister = self.origin.list_blocks if kind == "blocks" else self.origin.list_manifests
        infos = await self.filler.call(lambda: list(lister()))
        lines = "".join(json.dumps({"digest": i.digest, "size": i.size, "mtime": i.mtime}) + "\n"
                        for i in infos)
        return web.Response(text=lines, content_type="application/x-ndjson")

    async def get_tag(self, request: web.Request) -> web.Response:
        self.auth.read(request)
        ref = self._ref(request)
        digest = await self.filler.call(self.origin.get_tag, ref.name, ref.tag)
        return web.Response(text=digest + "\n", headers={"Cache-Control": "no-cache"})

    async def list_tags(self, request: web.Request) -> web.Response:
        self.auth.read(request)
        tags = await self.filler.call(self.origin.list_tags)
        return web.json_response([{"name": n, "tag": t, "digest": d} for n, t, d in tags])

    @staticmethod
    def _ref(request: web.Request) -> reference.Reference:
        try:
            ref = reference.parse(request.match_info["ref"])
        except FormatError as exc:
            raise HttpError(400, str(exc)) from None
        if ref.digest:
            raise HttpError(400, "a tag route takes NAME:TAG, not a digest")
        return ref

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "origin": self.origin.url, "cache_bytes": self.cache.bytes,
                                  "cache_entries": len(self.cache), "cache_capacity": self.cache.capacity})

    async def metrics_page(self, request: web.Request) -> web.Response:
        self.metrics.cache_state(self.cache)
        guard = getattr(request.protocol, "guard", None)
        if guard is not None:
            self.metrics.connection_state(guard)
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    # -- writes --------------------------------------------------------------------------------
    async def put_object(self, request: web.Request, kind: str) -> web.Response:
        self.auth.write(request)
        digest = self._digest(request)
        frame = await self.bodies.read(request, KIND_LIMIT[kind])
        try:
            await self.filler.call(verify, kind, digest, frame)
        except (IntegrityError, FormatError) as exc:
            self.metrics.verify_failures.labels("client").inc()
            raise HttpError(400, f"refused: {exc}") from None
        put = self.origin.put_block if kind == "blocks" else self.origin.put_manifest
        created = await self.filler.call(put, digest, frame)
        return web.json_response({"digest": digest, "created": created}, status=201 if created else 200)

    async def delete_object(self, request: web.Request, kind: str) -> web.Response:
        self.auth.write(request)
        digest = self._digest(request)
        delete = self.origin.delete_block if kind == "blocks" else self.origin.delete_manifest
        await self.filler.call(delete, digest)
        self.cache.drop(kind, digest)
        return web.Response(status=204)

    async def put_tag(self, request: web.Request) -> web.Response:
        self.auth.write(request)
        ref = self._ref(request)
        value = (await self.bodies.read(request, TAG_BODY)).decode("ascii", "replace").strip()
        if not digests.is_valid(value):
            raise HttpError(400, f"tag body must be a sha256 digest, got {value[:80]!r}")
        await self.filler.call(self.origin.put_tag, ref.name, ref.tag, value)
        return web.Response(status=204)

    async def list_leases(self, request: web.Request) -> web.Response:
        self.auth.write(request)
        leases = await self.filler.call(self.origin.list_leases)
        return web.json_response([{"name": n, "data": base64.b64encode(d).decode()} for n, d in leases])

    async def put_lease(self, request: web.Request) -> web.Response:
        self.auth.write(request)
        name = self._lease_name(request)
        await self.filler.call(self.origin.put_lease, name, await self.bodies.read(request, LEASE_BODY))
        return web.Response(status=204)

    async def delete_lease(self, request: web.Request) -> web.Response:
        self.auth.write(request)
        await self.filler.call(self.origin.delete_lease, self._lease_name(request))
        return web.Response(status=204)

    @staticmethod
    def _lease_name(request: web.Request) -> str:
        try:
            return lease.check_name(request.match_info["name"])
        except StoreError as exc:
            raise HttpError(400, str(exc)) from None


def _body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """Body bytes of an answer. aiohttp's body_length counts what went through its writer,
    headers included, and misses what sendfile(2) sent (every cached block), so a response
    that declares its length is counted by that, a streamed one by what its handler wrote."""
    if request.method == "HEAD":
        return 0
    if batches.BODY_BYTES in response:
        return response[batches.BODY_BYTES]
    if response.content_length is not None:
        return response.content_length
    return response.body_length or 0

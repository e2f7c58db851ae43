"""The batch answer (docs/protocol.md, "Batch fetch"): many blocks' records in one response.

The same bytes go out one of two ways:

- **From the disk cache by sendfile(2).** When every block asked for is cached here and was
  verified since the server started, the answer's length is known before its first byte. It goes
  out with a Content-Length, each frame straight from its cache file: no frame passes through the
  server's memory or its interpreter. (A node's startup profile and a restore's working set come
  this way from a warm server. Reading each frame into memory and writing it out again cost the
  server 1.3 ns of CPU per byte of frames, against 0.35 ns this way: `bench.server_load --batch`.)
- **Streamed as frames become ready** (chunked), when some must come from the origin first: the
  first frames do not wait for the slowest fill.

Once a sendfile answer has started, a cache file that is gone, unreadable (EIO) or short cuts
the answer short: the connection is closed, and the client, which counts every record's bytes,
sees a truncated answer and fetches again; the entry is dropped, so the next answer fills it from
the origin. No client is sent a record that lies. Any other failure (the client gone, the socket's
errors, the server out of descriptors) ends the answer the same way without blaming a file.
AIOHTTP_NOSENDFILE (aiohttp's switch) sends every batch the streamed way; the server never
compresses its answers (sendfile would bypass the compressor).
"""
from __future__ import annotations

import asyncio
import errno
import logging

from aiohttp import web
from aiohttp.web_fileresponse import NOSENDFILE  # AIOHTTP_NOSENDFILE: aiohttp's switch for it

from cache_server.diskcache import FILE_ERRORS, DiskCache
from cache_server.filler import Filler
from lazyfs.errors import LazyfsError, NotFound
from lazyfs.format import batch

BODY_BYTES = "lazyfs.body_bytes"  # the bytes a streamed answer sent (for metrics and the log)
PARALLEL = 16  # fills from the origin in flight for one answer
KIND = "blocks"
log = logging.getLogger("lazyfs.server")


async def answer(request: web.Request, wanted: list[str], filler: Filler,
                 cache: DiskCache) -> web.StreamResponse:
    """The batch answer for ``wanted`` (already checked: digests, at most batch.MAX_DIGESTS)."""
    if not NOSENDFILE and all(cache.verified(KIND, d) for d in wanted):
        return await _from_files(request, wanted, filler, cache)
    return await _streamed(request, wanted, filler, cache)


async def _record(filler: Filler, digest: str) -> tuple[int, str | None, bytes]:
    """(status, pinned cache path or None, frame in hand or b"") for one digest."""
    try:
        path, frame = await filler.obtain(KIND, digest)
    except NotFound:
        return 404, None, b""
    except (LazyfsError, OSError):
        return 502, None, b""
    return 200, path, frame or b""


async def _from_files(request: web.Request, wanted: list[str], filler: Filler,
                      cache: DiskCache) -> web.StreamResponse:
    pinned: list[str] = []
    resp = web.StreamResponse(headers={"Content-Type": batch.MEDIA_TYPE})
    sent = 0
    try:
        records = []
        for digest in wanted:  # cached and verified: nothing here waits on the disk or the origin
            status, path, frame = await _record(filler, digest)
            if path is not None:
                pinned.append(digest)
            size = cache.size(KIND, digest) if path is not None else len(frame)
            records.append((batch.encode_header(digest, status, size), path, frame, size))
        resp.content_length = sum(len(head) + size for head, _, _, size in records)
        await resp.prepare(request)
        for digest, (head, path, frame, size) in zip(wanted, records):
            await resp.write(head + frame)
            sent += len(head) + len(frame)
            if path is None:
                continue
            pinned.remove(digest)
            try:
                whole = await _send_file(request, resp, path, size)
            finally:
                cache.unpin(KIND, digest)
            if not whole:
                log.error("batch: cache file of %s unreadable or short: answer cut short", digest)
                request.transport.close()  # the client sees a truncated answer, not a wrong one
                filler.drop_damaged(KIND, digest)  # the next answer fills it again
                return resp
            sent += size
        await resp.write_eof()
    except ConnectionError:  # the answer cannot go on: nothing to blame on a file
        _end(request, sent)
    finally:
        for digest in pinned:  # obtained but never sent (the client went away)
            cache.unpin(KIND, digest)
        resp[BODY_BYTES] = sent
    return resp



async def _send_file(request: web.Request, resp: web.StreamResponse, path: str, size: int) -> bool:
    """The cache file's ``size`` bytes on the answer, by sendfile(2); False if the file is gone,
    unreadable or short. Anything else raises ConnectionError (the client gone, the socket's
    errors, the server short of descriptors): the answer ends, and no file is blamed."""
    loop = asyncio.get_running_loop()
    try:
        f = open(path, "rb")
    except OSError as exc:
        if exc.errno in FILE_ERRORS:
            return False
        log.warning("batch: cannot open a cache file: %s", exc)
        raise ConnectionAbortedError(str(exc)) from None
    with f:
        try:
            try:
                sent = await loop.sendfile(request.transport, f, 0, size)
            except NotImplementedError:  # a loop without sendfile: read and write it
                data = await loop.run_in_executor(None, f.read, size)
                await resp.write(data)
                sent = len(data)
        except ConnectionError:
            raise
        except OSError as exc:
            if exc.errno in FILE_ERRORS:
                return False
            raise ConnectionAbortedError(str(exc)) from None
        except RuntimeError:  # asyncio's word for a transport the client has closed
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("the client went away") from None
            raise
    return sent == size


def _end(request: web.Request, sent: int) -> None:
    """An answer cut short: close the connection, so that nothing follows the short body."""
    log.debug("batch: answer ended after %d bytes (the client went away, or the socket failed)", sent)
    if request.transport is not None:
        request.transport.close()


async def _streamed(request: web.Request, wanted: list[str], filler: Filler,
                    cache: DiskCache) -> web.StreamResponse:
    gate = asyncio.Semaphore(PARALLEL)
    pinned: list[str] = []  # digests pinned for this answer and not yet sent

    async def one(digest):
        """_record's answer; a cache path is pinned (later inserts of this batch must not evict
        it before it is sent)."""
        async with gate:
            if request.transport is None or request.transport.is_closing():
                return 502, None, b""  # the client has gone: no fill for an answer nobody reads
            status, path, frame = await _record(filler, digest)
            if path is not None:
                pinned.append(digest)
            return status, path, frame
    tasks = [asyncio.ensure_future(one(d)) for d in wanted]
    resp = web.StreamResponse(headers={"Content-Type": batch.MEDIA_TYPE})
    sent = 0
    try:
        await resp.prepare(request)
        for digest, task in zip(wanted, tasks):
            status, path, frame = await task
            if path is not None:
                try:  # off the event loop: a big frame must not stall other requests
                    frame = await filler.read(path)
                    if len(frame) != cache.size(KIND, digest):  # cut short since it was verified
                        filler.drop_damaged(KIND, digest)
                        status, frame = 502, b""
                except (LazyfsError, OSError):
                    status, frame = 502, b""
                finally:
                    pinned.remove(digest)
                    cache.unpin(KIND, digest)
            data = batch.encode_header(digest, status, len(frame)) + frame
            await resp.write(data)
            sent += len(data)
        await resp.write_eof()
    except ConnectionError:  # the answer cannot go on: nothing to blame on a file
        _end(request, sent)
    finally:
        for task in tasks:
            task.cancel()
        for digest in pinned:  # obtained but never sent (the client went away)
            cache.unpin(KIND, digest)
        resp[BODY_BYTES] = sent
    return resp

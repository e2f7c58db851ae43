"""A store behind one lazyfs cache server (``http://HOST:PORT``), speaking docs/protocol.md.

urllib3 keeps a pool of keep-alive connections that all threads share. Every body is read with a
size limit, so a broken or hostile server cannot make the client buffer without bound. Writes are
idempotent (objects are named by content), so they are retried on connection errors and 5xx.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from typing import Iterable, Iterator, NamedTuple
from urllib.parse import quote

import urllib3

from lazyfs.errors import (BlockNotFound, FormatError, LazyfsError, ManifestNotFound, NotCached, NotFound,
                           StoreAuthError, StoreError, StoreUnavailable, StoreUnreachable, TagNotFound)
from lazyfs.format import batch
from lazyfs.format import digest as digests
from lazyfs.format import reference
from lazyfs.format.block import MAX_FRAME_SIZE
from lazyfs.store.base import SMALL, ObjectInfo
from lazyfs.format.manifest import MAX_MANIFEST
from lazyfs.store.parallel import parallel_puts

LIST_LIMIT = 1 << 30


class Answer(NamedTuple):
    status: int
    headers: dict
    data: bytes


class HttpStore:
    def __init__(self, url: str, token: str | None = None, connect_timeout: float = 3.0,
                 read_timeout: float = 60.0, retries: int = 3, connections: int = 16):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self.retries = urllib3.Retry(total=retries, connect=retries, read=retries, backoff_factor=0.2,
                                     status_forcelist=(502, 503, 504), allowed_methods=None,
                                     raise_on_status=False) if retries else False
        self.http = urllib3.PoolManager(num_pools=4, maxsize=connections, block=False)
        self.threads = connections

    # -- transport ----------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None, limit: int = SMALL,
                 missing: NotFound | None = None, headers: dict | None = None,
                 stream: bool = False, not_cached: bool = False, once: bool = False):
        hdrs = dict(headers or {})
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        try:
            resp = self.http.request(method, self.url + path, body=body, headers=hdrs,
                                     timeout=self.timeout, retries=False if once else self.retries,
                                     redirect=False,
                                     preload_content=False)
        except urllib3.exceptions.HTTPError as exc:  # refused, reset, timed out, protocol error
            raise StoreUnreachable(f"{self.url}: {method} {path}: {_why(exc)}") from None
        if resp.status < 300 and stream:
            return resp
        try:
            # A HEAD answer is read too: http.client keeps a response open until it is read, and a
            # connection handed back with one open fails its next request (ResponseNotReady).
            data = resp.read(limit + 1)
            if len(data) > limit:
                resp.close()  # never reuse a connection with an unread body still in it
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnavailable(f"{self.url}: {method} {path}: {_why(exc)}") from None
        finally:
            resp.release_conn()
        if resp.status == 404 and missing is not None:
            raise missing
        if resp.status == 504 and not_cached:
            raise NotCached(f"{self.url}: {method} {path}: not in the server's cache")
        if resp.status >= 300:
            msg = _error_text(data) or resp.reason
            if resp.status in (401, 403):
                raise StoreAuthError(f"{self.url}: {method} {path}: {resp.status} {msg} "
                                "(set LAZYFS_TOKEN or LAZYFS_TOKEN_FILE)")
            if 400 <= resp.status < 500 and resp.status != 404:
                raise StoreError(f"{self.url}: {method} {path}: {resp.status} {msg}")
            raise StoreUnavailable(f"{self.url}: {method} {path}: {resp.status} {msg}")
        if len(data) > limit:
            raise StoreUnavailable(f"{self.url}: {method} {path}: answer larger than {limit} bytes")
        return Answer(resp.status, resp.headers, data)

    def _get(self, path: str, limit: int, missing: NotFound) -> bytes:
        return self._request("GET", path, limit=limit, missing=missing).data

    # -- the BlockStore protocol ---------------------------------------------------------------
    def remove_if_unused(self) -> None:
        pass  # check() creates nothing here

    def check(self, write: bool = False) -> None:
        self._request("GET", "/healthz")
        if write:
            self._request("GET", "/v1/leases")  # needs the write token: fail before a long build

    def has_block(self, digest: str) -> bool:
        """Whether the origin behind the server has the block: what a build asks before it skips
        an upload. The server's cache may hold a block the origin no longer has (collected by
        gc beside this server), and a manifest naming it would break once the cache lets it go."""
        return self.block_size(digest, origin=True) is not None

    def block_size(self, digest: str, origin: bool = False) -> int | None:
        """The frame's size, from the server's cache if it holds it (``origin``: the origin's)."""
        try:
            resp = self._request("HEAD", f"/v1/blocks/{digests.validate(digest)}", missing=BlockNotFound(digest),
                                 headers={"Cache-Control": "no-cache"} if origin else None)
        except BlockNotFound:
            return None
        return int(resp.headers["Content-Length"])

    def get_block(self, digest: str, cached_only: bool = False) -> bytes:
        """The stored frame; with cached_only, only if the server has it cached (NotCached
        otherwise): a hedge that must not make a second server fill from the origin."""
        path = f"/v1/blocks/{digests.validate(digest)}"
        if not cached_only:
            return self._get(path, MAX_FRAME_SIZE, BlockNotFound(digest))
        answer = self._request("GET", path, limit=MAX_FRAME_SIZE, missing=BlockNotFound(digest),
                               headers={"Cache-Control": "only-if-cached"}, not_cached=True)
        return answer.data

    def get_blocks(self, wanted: list[str], within: float | None = None
                   ) -> Iterator[tuple[str, bytes | bytearray | None]]:
        """Many blocks in one round trip: (digest, frame), or (digest, None) when the server has
        no such block; in request order. Raises StoreUnavailable if the server fails for one,
        or (``within``) leaves the answer's next record that many seconds in coming.
        A frame read straight from the socket is a bytearray (no copy into bytes)."""
        for d in wanted:
            digests.validate(d)
        resp = self._request("POST", "/v1/blocks/batch", body=json.dumps({"digests": wanted}).encode(),
                             headers={"Content-Type": "application/json"}, stream=True)
        reader, exact = _batch_body(resp)
        complete = False
        stall = _Stall(resp, within)
        try:
            for expected in wanted:
                line = reader.readline(batch.MAX_HEADER)
                if not line.endswith(b"\n") and len(line) < batch.MAX_HEADER:
                    raise StoreUnavailable(f"{self.url}: batch answer truncated at {expected}")
                header = batch.decode_header(line)
                if header.digest != expected:
                    raise FormatError(f"batch answer out of order: {header.digest} for {expected}")
                if header.status == 502:
                    raise StoreUnavailable(f"{self.url}: batch: the server's origin failed for {expected}")
                frame = exact(header.length) if header.status == 200 else None
                if frame is not None and len(frame) != header.length:
                    raise StoreUnavailable(f"{self.url}: batch answer truncated at {expected}")
                stall.pause()  # (the time the caller takes with a record is not the server's)
                yield expected, frame
                stall.watch()
            try:
                extra = reader.read(1)  # also consumes the end of the chunked body
            except ValueError:  # urllib3 closed it at the end of the body already
                extra = b""
            if extra:
                raise FormatError("batch answer has data after its last record")
            complete = True
        except Exception as exc:
            if stall.cut:
                raise StoreUnavailable(f"{self.url}: batch: no record for {within:g} s") from None
            if isinstance(exc, LazyfsError):
                raise
            if isinstance(exc, ValueError):  # urllib3 closed a chunked body that ended early
                raise StoreUnavailable(f"{self.url}: batch answer truncated") from None
            if isinstance(exc, (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)):
                raise StoreUnavailable(f"{self.url}: batch: {_why(exc)}") from None
            raise
        finally:
            stall.end()
            if not complete or stall.cut:  # (cut just as it ended: its socket is shut all the same)
                resp.close()  # an abandoned or broken answer: do not reuse its connection
            resp.release_conn()

    def put_block(self, digest: str, frame: bytes) -> bool:
        resp = self._request("PUT", f"/v1/blocks/{digests.validate(digest)}", body=frame)
        return resp.status == 201

    def put_blocks(self, items: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, bool]]:
        return parallel_puts(self.put_block, items, self.threads)

    def list_blocks(self) -> Iterator[ObjectInfo]:
        return self._list("blocks")

    def _list(self, kind: str) -> Iterator[ObjectInfo]:
        data = self._request("GET", f"/v1/{kind}", limit=LIST_LIMIT).data
        for line in data.splitlines():
            d = json.loads(line)
            yield ObjectInfo(digests.validate(d["digest"]), int(d["size"]), float(d["mtime"]))

    def delete_block(self, digest: str) -> None:
        self._request("DELETE", f"/v1/blocks/{digests.validate(digest)}")

    def get_manifest(self, digest: str) -> bytes:
        return self._get(f"/v1/manifests/{digests.validate(digest)}", MAX_MANIFEST * 2,
                         ManifestNotFound(digest))

    def put_manifest(self, digest: str, frame: bytes) -> bool:
        return self._request("PUT", f"/v1/manifests/{digests.validate(digest)}", body=frame).status == 201

    def list_manifests(self) -> Iterator[ObjectInfo]:
        return self._list("manifests")

    def delete_manifest(self, digest: str) -> None:
        self._request("DELETE", f"/v1/manifests/{digests.validate(digest)}")

    @staticmethod
    def _tag_path(name: str, tag: str) -> str:
        ref = reference.parse(f"{name}:{tag}")
        return "/v1/tags/" + quote(f"{ref.name}:{ref.tag}", safe="/:")

    def get_tag(self, name: str, tag: str) -> str:
        value = self._get(self._tag_path(name, tag), 200, TagNotFound(f"{name}:{tag}", self.url))
        return digests.validate(value.decode("ascii", "replace").strip())

    def put_tag(self, name: str, tag: str, digest: str) -> None:
        self._request("PUT", self._tag_path(name, tag), body=digests.validate(digest).encode())

    def list_tags(self) -> list[tuple[str, str, str]]:
        data = json.loads(self._request("GET", "/v1/tags", limit=LIST_LIMIT).data)
        return sorted((t["name"], t["tag"], digests.validate(t["digest"])) for t in data)

    def contribute_profile(self, image_digest: str, workload: str | None, data: bytes) -> dict:
        """Hand one start's startup profile (lazyfs.format.profile bytes) to the server, which
        merges it into the store's profile of the image (docs/protocol.md §2, "Profiles"). Needs
        only the node token, never the store's write token."""
        query = f"?workload={workload}" if workload else ""
        # Once: a merge is not idempotent, and an answer lost after the server merged would, sent
        # again, count this start twice.
        answer = self._request("POST", f"/v1/profiles/{digests.validate(image_digest)}{query}",
                               body=data, headers={"Content-Type": "application/octet-stream"},
                               once=True)
        try:
            return dict(json.loads(answer.data))
        except (ValueError, TypeError):
            raise StoreUnavailable(f"{self.url}: POST /v1/profiles: not a JSON object") from None

    def put_lease(self, name: str, data: bytes) -> None:
        self._request("PUT", f"/v1/leases/{quote(name, safe='')}", body=data)

    def list_leases(self) -> list[tuple[str, bytes]]:
        data = json.loads(self._request("GET", "/v1/leases", limit=LIST_LIMIT).data)
        return sorted((d["name"], base64.b64decode(d["data"])) for d in data)

    def delete_lease(self, name: str) -> None:
        self._request("DELETE", f"/v1/leases/{quote(name, safe='')}")

    def close(self) -> None:
        self.http.clear()

    def __repr__(self) -> str:
        return f"HttpStore({self.url!r})"


class _Stall:
    """Shuts an answer's socket once its next record has been ``within`` seconds in coming (None:
    never). The socket's timeout bounds each read only: a server sending a byte now and then
    would hold a batch, and every read waiting on its blocks, for as long as it liked. One
    watching thread a batch, looking every quarter of ``within`` (not a timer a record)."""

    def __init__(self, resp, within: float | None):
        self.resp, self.within = resp, within
        self.cut = False
        self._since: float | None = time.monotonic()  # None: the caller has the record
        self._done = threading.Event()
        if within is not None:
            threading.Thread(target=self._watch, name="batch-stall", daemon=True).start()

    def watch(self) -> None:
        self._since = time.monotonic()

    def pause(self) -> None:
        self._since = None

    def end(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(self.within / 4):
            since = self._since
            if since is not None and time.monotonic() - since >= self.within:
                self.cut = True
                try:
                    self.resp.shutdown()
                except Exception:  # noqa: BLE001 - handed back to its pool already: it was whole
                    pass
                return


def _batch_body(resp) -> tuple:
    """(reader with readline and read, exact(n) -> up to n bytes) for a batch answer's body.

    An answer with a Content-Length (the server sends cached blocks so) is read straight from
    http.client's response under urllib3's, each frame in one readinto: through urllib3's own
    reads and a buffer on top, a frame was copied three more times, 0.57 against 0.29 ns of the
    node's CPU per byte (0.6 GB of 512 KiB float blocks). A chunked answer goes through urllib3."""
    raw = getattr(resp, "_fp", None)
    if isinstance(raw, http.client.HTTPResponse) and not raw.chunked and raw.length is not None \
            and "Content-Encoding" not in resp.headers:
        def exact(n: int) -> bytearray:
            buf = bytearray(n)
            got = raw.readinto(buf) if n else 0
            return buf if got == n else buf[:got]
        return raw, exact
    reader = io.BufferedReader(resp, 1 << 20)
    return reader, reader.read


def _why(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc)


def _error_text(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode("utf-8", "replace").strip()

"""A registry on 127.0.0.1 that speaks enough of the distribution API for a pull, and misbehaves
as a test tells it: it stalls, trickles, lies about sizes, redirects in circles, answers without
end. A stdlib server on threads (tests/test_registry_hostile.py runs `lazyfs build` against it).

Content is put in with :meth:`HostileRegistry.blob` and :meth:`HostileRegistry.manifest`; an
answer to replace the honest one is any ``Answer``: a function of the request handler and whether
the request is a HEAD. Every answer that waits wakes when the server closes, so closing never
hangs on a thread that is stalling on purpose.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

from imagebuilder.ociwriter import TarEntry, make_tar

Answer = Callable[["Handler", bool], None]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
PIECE = bytes(range(256)) * 256  # 64 KiB to send again and again for a big body


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    """One request as the server saw it."""
    method: str
    path: str
    headers: dict = field(default_factory=dict)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real registry: one connection for many blobs
    # Headers and body go out as separate writes: with Nagle's algorithm each small answer would
    # wait out the client's delayed ACK (40 ms), and 10,000 layers would take minutes.
    disable_nagle_algorithm = True
    registry: "HostileRegistry"

    def log_message(self, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        reg = self.registry
        reg.seen.append(Seen(self.command, self.path, dict(self.headers)))
        path = self.path.split("?")[0]
        if path in reg.answers:
            return reg.answers[path](self, head)
        if reg.auth is not None and self.headers.get("Authorization") != reg.auth[1]:
            return self.send(401, b"", {"WWW-Authenticate": reg.auth[0]})
        if path == "/v2/":
            return self.send(200, b"{}")
        kind, _, name = path.removeprefix(f"/v2/{reg.repo}/").partition("/")
        found = {"manifests": reg.manifests, "blobs": reg.blobs}.get(kind, {}).get(name)
        if found is None:
            return self.send(404, b'{"errors":[{"code":"NOT_FOUND","message":"not here"}]}')
        body, media = found
        self.send(200, b"" if head else body, {"Content-Type": media, "Content-Length": str(len(body))})

    # -- ways to answer -------------------------------------------------------------------------
    def send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def stream(self, status: int, pieces: Iterator[bytes], headers: dict, head: bool = False) -> None:
        """Send ``pieces`` as they come; without a Content-Length, the body ends when the
        connection closes. A client that hangs up ends it too."""
        self.send_response(status)
        if "Content-Length" not in headers:
            headers = {**headers, "Connection": "close"}
            self.close_connection = True
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if head:
            return
        try:
            for piece in pieces:
                self.wfile.write(piece)
                self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client went away: what it was sent no longer matters


class HostileRegistry:
    """One repository (``hostile/app``) on a server of its own. ``auth``: (challenge, the
    Authorization value that passes it), or None for an open registry."""

    def __init__(self, repo: str = "hostile/app"):
        self.repo = repo
        self.manifests: dict[str, tuple[bytes, str]] = {}  # tag or digest -> (body, media type)
        self.blobs: dict[str, tuple[bytes, str]] = {}
        self.answers: dict[str, Answer] = {}  # request path -> an answer that replaces the honest one
        self.auth: tuple[str, str] | None = None
        self.seen: list[Seen] = []
        self.peers: list[HostileRegistry] = []  # other servers this one's answers send clients to
        self.closing = threading.Event()
        handler = type("BoundHandler", (Handler,), {"registry": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def ref(self, tag: str = "1") -> str:
        return f"docker://{self.host}/{self.repo}:{tag}"

    def blob_path(self, digest: str) -> str:
        return f"/v2/{self.repo}/blobs/{digest}"

    def manifest_path(self, reference: str) -> str:
        return f"/v2/{self.repo}/manifests/{reference}"

    # -- content --------------------------------------------------------------------------------
    def blob(self, data: bytes, media: str = "application/octet-stream") -> dict:
        """Store a blob; its descriptor."""
        digest = digest_of(data)
        self.blobs[digest] = (data, media)
        return {"mediaType": media, "digest": digest, "size": len(data)}

    def manifest(self, doc: dict, tag: str = "1") -> str:
        data = json.dumps(doc).encode()
        self.manifests[tag] = self.manifests[digest_of(data)] = (data, doc["mediaType"])
        return digest_of(data)

    def image(self, layers: list[bytes], tag: str = "1", diff_ids: list[str] | None = None) -> dict:
        """An image of gzip layers, with its config; the manifest document."""
        descs = [self.blob(layer, LAYER) for layer in layers]
        diff_ids = diff_ids or [digest_of(gzip.decompress(layer)) for layer in layers]
        config = self.blob(json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                                       "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode(), CONFIG)
        doc = {"schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": descs}
        self.manifest(doc, tag)
        return doc

    # -- answers a test puts in place of the honest ones -----------------------------------------
    def wait(self, seconds: float | None = None) -> None:
        """Sleep, or until the server closes."""
        self.closing.wait(seconds)

    def stall_after(self, data: bytes, sent: int) -> Answer:
        """Headers saying the whole blob, ``sent`` bytes of it, then nothing."""
        def answer(h: Handler, head: bool) -> None:
            h.stream(200, iter([data[:sent]]), {"Content-Length": str(len(data))}, head)
            if not head:
                self.wait()
        return answer

    def trickle(self, data: bytes, every: float) -> Answer:
        """The whole blob, one byte every ``every`` seconds."""
        def pieces() -> Iterator[bytes]:
            for i in range(len(data)):
                if self.closing.is_set():
                    return
                yield data[i:i + 1]
                self.wait(every)
        return lambda h, head: h.stream(200, pieces(), {"Content-Length": str(len(data))}, head)

    def sized(self, size: int, length: int | None = None) -> Answer:
        """``size`` bytes of filler; a Content-Length of ``length`` (default: the truth; -1: none)."""
        length = size if length is None else length
        headers = {"Content-Length": str(length)} if length >= 0 else {}
        return lambda h, head: h.stream(200, filler(size, self.closing), headers, head)

    def endless(self) -> Answer:
        """A body with no length that never ends."""
        return lambda h, head: h.stream(200, filler(None, self.closing), {}, head)

    def silent(self) -> Answer:
        """Never a byte: not even the status line."""
        return lambda h, head: self.wait()

    def redirect(self, location: str, status: int = 302) -> Answer:
        return lambda h, head: h.send(status, b"", {"Location": location})

    # -- lifetime -------------------------------------------------------------------------------
    def __enter__(self) -> "HostileRegistry":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def filler(size: int | None, stop: threading.Event) -> Iterator[bytes]:
    """``size`` bytes (None: without end) of a repeated piece, never held whole."""
    sent = 0
    while (size is None or sent < size) and not stop.is_set():
        piece = PIECE if size is None else PIECE[:size - sent]
        sent += len(piece)
        yield piece


def layer(entries: list[TarEntry]) -> bytes:
    return gzip.compress(make_tar(entries), mtime=0)


def zeros_bomb(size: int) -> tuple[bytes, str]:
    """A gzip layer holding one file of ``size`` zero bytes (a multiple of 1 MiB), and its
    diff_id, made without deflating ``size`` bytes: a deflate stream of 1 MiB of zeros from a
    fresh compressor, ended by a full flush, refers to nothing before it, so it is repeated as is."""
    mib = 1 << 20
    assert size % mib == 0
    info = tarfile.TarInfo("zeros")
    info.size = size
    header = info.tobuf(format=tarfile.GNU_FORMAT)  # GNU: sizes past 8 GiB too
    tail = b"\0" * 1024  # the end-of-archive blocks (size is a multiple of 512: no padding)

    def deflated(data: bytes, mode: int) -> bytes:
        z = zlib.compressobj(9, zlib.DEFLATED, -15)
        return z.compress(data) + z.flush(mode)

    zero_mib = bytes(mib)
    crc, diff = zlib.crc32(header), hashlib.sha256(header)
    for _ in range(size // mib):
        crc = zlib.crc32(zero_mib, crc)
        diff.update(zero_mib)
    crc = zlib.crc32(tail, crc)
    diff.update(tail)
    total = len(header) + size + len(tail)
    gz = (b"\x1f\x8b\x08\0\0\0\0\0\0\xff" + deflated(header, zlib.Z_FULL_FLUSH)
          + deflated(zero_mib, zlib.Z_FULL_FLUSH) * (size // mib) + deflated(tail, zlib.Z_FINISH)
          + crc.to_bytes(4, "little") + (total % (1 << 32)).to_bytes(4, "little"))
    return gz, "sha256:" + diff.hexdigest()

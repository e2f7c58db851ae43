"""A registry client for pulls: the OCI distribution API over the project's urllib3 pool.

Manifests are read whole (they are small and bounded); blobs are streamed through
:class:`BlobReader`, which survives resets and 5xx answers by asking again for the rest of the
blob with a Range request. Nothing here trusts the registry's bytes: callers hash what they read
and compare with the digest they asked for (manifests here, layers in tarlayer.read_layer), every
body is read up to a bound (a blob's declared size, MAX_JSON, MAX_TOKEN), and every read is held
to the progress rule of :class:`Pace`, so no answer can make a build wait forever.

Why hand-written rather than oras-py or skopeo: oras-py downloads a blob whole to a file before
anyone can read it, and `skopeo copy` writes the whole image to disk first (the two-step path this
source replaces). Neither streams into the layer reader, and both would add a second HTTP stack
beside urllib3, which the HTTP store already uses. docs/registry.md has the numbers.
"""
from __future__ import annotations

import json
import time
import warnings
from typing import BinaryIO

import urllib3

from lazyfs.errors import (BlobSizeMismatch, DownloadStalled, LayerDigestMismatch, NotAnImage,
                           RegistryAuthError, RegistryError)
from lazyfs.format import digest as digests

from imagebuilder.sources import regauth
from imagebuilder.sources.blobs import MAX_JSON
from imagebuilder.sources.dockerref import DockerRef
from imagebuilder.sources.model import DownloadLimits
from imagebuilder.sources.oci import INDEX_TYPES, MANIFEST_TYPES

# One request is tried this many times on a connection error or a 429/5xx, and a blob download
# resumes this many times in a row without progress, waiting BACKOFF_FIRST·2ⁿ (at most
# BACKOFF_MAX) seconds between tries: about 12 s in all, long enough for a registry restart.
RETRIES = 6
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 4.0
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
CONNECT_TIMEOUT = 10.0
READ_SIZE = 1 << 20
# A token answer is a JSON object with a JWT of a few KiB (more with a certificate chain in x5c).
MAX_TOKEN = 1 << 20
ERROR_BODY = 65536  # what is read of a failed answer's body, for its message
ACCEPT = ", ".join(sorted(MANIFEST_TYPES | INDEX_TYPES))


def backoff(attempt: int) -> float:
    return min(BACKOFF_MAX, BACKOFF_FIRST * (2 ** attempt))


def _error_text(body: bytes, reason: str | None) -> str:
    """The first message of a distribution error body, or the HTTP reason."""
    try:
        first = (json.loads(body or b"{}").get("errors") or [])[0]
        return f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except (ValueError, AttributeError, IndexError, TypeError, UnicodeDecodeError):
        return reason or ""


def _reason(exc: Exception) -> str:
    """'[Errno 111] Connection refused' rather than urllib3's whole wrapped repr."""
    text = str(getattr(exc, "reason", None) or exc)
    return text.rpartition("): ")[2] if "): " in text else text


def _release(resp: urllib3.BaseHTTPResponse, complete: bool) -> None:
    """Hand the connection back for reuse only when its body was read to the end; otherwise
    close it, so no later request reads what is left of this answer."""
    resp.release_conn() if complete else resp.close()


class Pace:
    """The progress rule of one download (docs/registry.md, "Slow and stalled downloads").

    Time is counted on the download's own clock, which runs only while the build waits on the
    registry (connecting, reading, backing off before a resume): a build that is slow to consume
    the bytes (compressing on a busy machine) never counts against the registry. The download
    fails with DownloadStalled when no byte has come for ``limits.stall`` seconds of that clock,
    resumes included, or when a window of ``limits.window`` seconds brought fewer than
    ``limits.min_rate`` bytes a second (or, near the end, fewer than were left): a read timeout
    alone never trips on a registry that trickles a byte now and then."""

    def __init__(self, limits: DownloadLimits, what: str, digest: str | None = None,
                 left: int | None = None):
        self.limits, self.what, self.digest = limits, what, digest
        self.clock = 0.0  # seconds spent waiting on the registry for this download
        self.last_byte = 0.0  # the clock when a byte last came
        self.window_start, self.window_got = 0.0, 0
        self.window_need = self._need(left)

    def _need(self, left: int | None) -> int:
        need = int(self.limits.min_rate * self.limits.window)
        return need if left is None else min(need, left)

    def read_timeout(self) -> float:
        """How long the next wait may last before the stall timeout is spent."""
        return max(0.01, self.limits.stall - (self.clock - self.last_byte))

    def stalled(self, offset: int) -> DownloadStalled:
        return DownloadStalled(f"{self.what}: no data for {self.limits.stall:g} s at byte {offset} "
                               f"(stall timeout)", self.digest)

    def account(self, seconds: float, got: int, offset: int, left: int | None) -> None:
        """One wait of ``seconds`` that brought ``got`` bytes, the download at ``offset`` with
        ``left`` bytes to come (None: unknown); raises DownloadStalled when the rule is broken."""
        self.clock += seconds
        if got:
            self.last_byte = self.clock
            self.window_got += got
        if self.clock - self.last_byte >= self.limits.stall:
            raise self.stalled(offset)
        elapsed = self.clock - self.window_start
        if elapsed >= self.limits.window:
            if self.window_got < self.window_need:
                raise DownloadStalled(f"{self.what}: {self.window_got} bytes in {elapsed:.0f} s at byte "
                                      f"{offset}, under the minimum rate of {self.limits.min_rate} "
                                      f"bytes/s", self.digest)
            self.window_start, self.window_got, self.window_need = self.clock, 0, self._need(left)

    def read1(self, resp: urllib3.BaseHTTPResponse, n: int, offset: int, left: int | None) -> bytes:
        """At most ``n`` bytes, whatever one read of the socket brings (a full-size read would
        wait for all of them, and a byte every few seconds would keep it waiting forever)."""
        conn = resp.connection
        if conn is not None and conn.sock is not None:
            # The wait may last what is left of the stall timeout, not a whole one again.
            conn.sock.settimeout(self.read_timeout())
        began = time.monotonic()
        try:
            data = resp.read1(n)
        except urllib3.exceptions.ReadTimeoutError:
            raise self.stalled(offset) from None  # the socket waited out the stall timeout
        except urllib3.exceptions.HTTPError:
            self.account(time.monotonic() - began, 0, offset, left)  # a break costs time too
            raise
        self.account(time.monotonic() - began, len(data), offset + len(data), left)
        return data


def read_body(resp: urllib3.BaseHTTPResponse, limit: int, pace: Pace) -> bytes:
    """An answer's body, or its first ``limit + 1`` bytes when it is longer (the caller refuses
    it); never more is read or held, and the connection is freed either way."""
    parts, got, complete = [], 0, False
    try:
        while got <= limit:
            data = pace.read1(resp, min(READ_SIZE, limit + 1 - got), got, None)
            if not data:
                complete = True
                break
            parts.append(data)
            got += len(data)
    finally:
        _release(resp, complete)
    return b"".join(parts)


class Registry:
    """One repository on one registry, with its credentials and its auth state."""

    def __init__(self, ref: DockerRef, creds: regauth.Credentials | None = None,
                 tls_verify: bool = True, env: dict | None = None,
                 limits: DownloadLimits = DownloadLimits()):
        self.ref = ref
        self.creds = creds or regauth.lookup(ref.host, ref.repo, env)
        self.tls_verify = tls_verify
        self.limits = limits
        self.scope = f"repository:{ref.repo}:pull"
        # A read that waits out the stall timeout has broken the progress rule (Pace) already.
        self.timeout = urllib3.Timeout(connect=CONNECT_TIMEOUT, read=limits.stall)
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=8, timeout=self.timeout,
                                        cert_reqs="CERT_REQUIRED" if tls_verify else "CERT_NONE")
        # A registry may redirect blobs to its storage (S3, a CDN); urllib3 drops Authorization
        # on a redirect to another host. Failures are retried by us, not urllib3.
        self.follow = urllib3.Retry(total=8, connect=0, read=0, status=0, other=0, redirect=8)
        # https first; plain HTTP only when the user turned verification off (podman's rule).
        self.schemes = ["https"] if tls_verify else ["https", "http"]
        self.authorization: str | None = None
        self.requests = 0

    # -- transport ----------------------------------------------------------------------------
    def _open(self, method: str, url: str, headers: dict, fields: dict | None = None,
              timeout: float | None = None) -> urllib3.BaseHTTPResponse:
        """Send; the body is left unread. It is never decoded: what a digest names is the bytes
        as sent, and a Content-Encoding would let the registry inflate them past every bound."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            self.requests += 1
            wait = self.timeout if timeout is None else urllib3.Timeout(connect=CONNECT_TIMEOUT, read=timeout)
            return self.pool.request(method, url, fields=fields, headers=headers, retries=self.follow,
                                     preload_content=False, decode_content=False, timeout=wait)

    def _connect(self, method: str, path: str, headers: dict,
                 timeout: float | None = None) -> urllib3.BaseHTTPResponse:
        """One try; the scheme is settled by the first request that gets an answer."""
        while True:
            url = f"{self.schemes[0]}://{self.ref.api_host}{path}"
            try:
                return self._open(method, url, headers, timeout=timeout)
            except urllib3.exceptions.MaxRetryError as exc:
                if isinstance(exc.reason, urllib3.exceptions.SSLError):
                    if len(self.schemes) > 1:
                        self.schemes.pop(0)  # --tls-verify=false: a plain-HTTP registry
                        continue
                    raise RegistryError(f"{self.ref.host}: TLS handshake failed ({exc.reason}); for a "
                                        "plain-HTTP registry, or one you trust without a valid "
                                        "certificate, pass --tls-verify=false") from None
                self._unretryable(exc, f"{method} {path}")
                raise

    def _unretryable(self, exc: urllib3.exceptions.MaxRetryError, what: str) -> None:
        """Raise for the failures another try cannot mend: a redirect loop, and an answer that
        never came within the stall timeout (asking again would only wait as long again)."""
        if isinstance(exc.reason, urllib3.exceptions.ReadTimeoutError):
            raise DownloadStalled(f"{self.ref.host}: {what}: no answer in {self.limits.stall:g} s "
                                  "(stall timeout)") from None
        if isinstance(exc.reason, urllib3.exceptions.ResponseError):
            raise RegistryError(f"{self.ref.host}: {what}: {exc.reason} (more than "
                                f"{self.follow.redirect} redirects)") from None

    def _drain(self, resp: urllib3.BaseHTTPResponse) -> str:
        """Read a failed answer's (bounded) body, free the connection, return its error text."""
        try:
            body = read_body(resp, ERROR_BODY, Pace(self.limits, f"{self.ref.host}: error answer"))
        except (urllib3.exceptions.HTTPError, DownloadStalled):
            body = b""
        return _error_text(body[:ERROR_BODY], resp.reason)

    def request(self, method: str, path: str, headers: dict | None = None,
                ok: tuple[int, ...] = (200,), timeout: float | None = None) -> urllib3.BaseHTTPResponse:
        """Send with auth, retrying connection errors and 429/5xx; the answer's body is unread.
        ``timeout``: how long to wait for the answer (default: the stall timeout).

        A 404 is returned to the caller (it knows what was missing); other failures raise."""
        authenticated = False
        failure = ""
        for attempt in range(RETRIES):
            hdrs = {"User-Agent": "lazyfs", **(headers or {})}
            if self.authorization:
                hdrs["Authorization"] = self.authorization
            try:
                resp = self._connect(method, path, hdrs, timeout)
            except urllib3.exceptions.HTTPError as exc:
                failure = _reason(exc)
                time.sleep(backoff(attempt))
                continue
            if resp.status in ok or resp.status == 404:
                return resp
            text = self._drain(resp)
            if resp.status == 401 and not authenticated:
                self._authenticate(resp.headers.get("WWW-Authenticate", ""))
                authenticated = True
                continue
            if resp.status in (401, 403):
                raise self._refused(resp.status, text)
            if resp.status in RETRY_STATUS:
                failure = f"HTTP {resp.status} {text}"
                time.sleep(backoff(attempt))
                continue
            raise RegistryError(f"{self.ref.host}: {method} {path}: HTTP {resp.status} {text}")
        raise RegistryError(f"{self.ref.host}: {method} {path} failed {RETRIES} times ({failure})")

    # -- auth -----------------------------------------------------------------------------------
    def _refused(self, status: int, text: str) -> RegistryAuthError:
        what = "denied" if status == 403 else "refused"
        who = f"credentials from {self.creds.source}" if self.creds else "no credentials"
        return RegistryAuthError(f"{self.ref.host}: access {what} for {self.scope} (HTTP {status}: "
                                 f"{text}; {who})")

    def _no_creds(self) -> RegistryAuthError:
        files = ", ".join(str(p) for p in regauth.auth_files())
        return RegistryAuthError(f"{self.ref.host}: authentication required for {self.scope} and no "
                                 f"credentials found (--creds USER:PASS, or an auths entry in {files})")

    def _authenticate(self, challenge: str) -> None:
        scheme, params = regauth.parse_challenge(challenge)
        if scheme == "basic":
            if not self.creds:
                raise self._no_creds()
            self.authorization = self.creds.basic()
            return
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryAuthError(f"{self.ref.host}: unsupported auth challenge {challenge[:80]!r}")
        self.authorization = "Bearer " + self._token(params)

    def _token(self, params: dict) -> str:
        realm = params["realm"]
        if realm.startswith("http://") and self.tls_verify:
            raise RegistryAuthError(f"{self.ref.host}: token service {realm} is plain HTTP; pass "
                                    "--tls-verify=false to send credentials to it")
        fields = {"scope": self.scope, **({"service": params["service"]} if "service" in params else {})}
        headers = {"User-Agent": "lazyfs"}
        if self.creds:
            headers["Authorization"] = self.creds.basic()
        what = f"{self.ref.host}: token service {realm}"
        try:
            try:
                resp = self._open("GET", realm, headers, fields)
            except urllib3.exceptions.MaxRetryError as exc:
                self._unretryable(exc, f"token service {realm}")
                raise
            if resp.status in (401, 403):
                resp.close()
                who = f"credentials from {self.creds.source}" if self.creds else "no credentials"
                raise RegistryAuthError(f"{what} refused {who} for {self.scope} (HTTP {resp.status})")
            data = read_body(resp, MAX_TOKEN, Pace(self.limits, what))
        except urllib3.exceptions.HTTPError as exc:
            raise RegistryError(f"{what} unreachable ({_reason(exc)})") from None
        if len(data) > MAX_TOKEN:
            raise RegistryAuthError(f"{what} answered more than {MAX_TOKEN} bytes")
        try:
            body = json.loads(data)
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError, UnicodeDecodeError):
            token = None
        if resp.status != 200 or not isinstance(token, str) or not token:
            raise RegistryAuthError(f"{self.ref.host}: token service {realm} gave no token "
                                    f"(HTTP {resp.status})")
        return token

    # -- the distribution API -------------------------------------------------------------------
    def manifest(self, reference: str, size: int | None = None) -> tuple[bytes, str | None, str]:
        """(bytes, media type, digest) of a manifest or index by tag or digest, verified when the
        reference is a digest; ``size``, the size a descriptor declares for it, is checked too."""
        path = f"/v2/{self.ref.repo}/manifests/{reference}"
        what = f"{self.ref.host}/{self.ref.repo}: manifest"
        if size is not None and size > MAX_JSON:
            raise RegistryError(f"{what} {reference}: its descriptor says {size} bytes, more than "
                                f"the {MAX_JSON} a manifest may have", reference)
        resp = self.request("GET", path, {"Accept": ACCEPT})
        if resp.status == 404:
            raise NotAnImage(f"{self.ref.host}/{self.ref.repo}: no manifest {reference} "
                             f"(HTTP 404 {self._drain(resp)})")
        limit = MAX_JSON if size is None else size
        try:
            data = read_body(resp, limit, Pace(self.limits, f"{what} {reference}", reference))
        except urllib3.exceptions.HTTPError as exc:
            raise RegistryError(f"{self.ref.host}: reading manifest {reference}: {_reason(exc)}",
                                reference) from None
        if size is not None and len(data) != size:
            actual = f"more than {size} bytes" if len(data) > size else f"{len(data)} bytes"
            raise BlobSizeMismatch(what, reference, size, f"the registry sends {actual}")
        if len(data) > MAX_JSON:
            raise RegistryError(f"{self.ref.host}: manifest {reference} is larger than {MAX_JSON} bytes",
                                reference)
        actual = digests.compute(data)
        if digests.is_valid(reference) and actual != reference:
            raise LayerDigestMismatch(f"{self.ref.host}/{self.ref.repo}: manifest", reference, actual)
        media = (resp.headers.get("Content-Type") or "").split(";")[0].strip() or None
        return data, media, actual

    def blob_size(self, digest: str) -> int | None:
        """The blob's size from a HEAD, or None if the registry has no such blob."""
        resp = self.request("HEAD", f"/v2/{self.ref.repo}/blobs/{digest}")
        resp.read(1)  # closes the answer, so its connection can carry the next request
        resp.release_conn()
        if resp.status == 404:
            return None
        length = resp.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else None

    def blob(self, digest: str, size: int | None = None) -> "BlobReader":
        """The blob to stream; ``size`` is the size its descriptor declares, which the download is
        held to (None: whatever Content-Length says, unchecked)."""
        return BlobReader(self, digest, size)


def _length(resp: urllib3.BaseHTTPResponse) -> int | None:
    text = resp.headers.get("Content-Length") or ""
    return int(text) if text.isdigit() else None


class BlobReader:
    """A blob as a file to read once, front to back. Breaks are resumed with a Range request;
    a registry that ignores Range sends the whole blob again and the part already read is skipped.

    With a declared size the blob must be exactly that long: an answer whose length says
    otherwise is refused before its body is read, and one of unknown length is read no further
    than the size, then made to end there. Every read is held to the progress rule (Pace)."""

    def __init__(self, registry: Registry, digest: str, size: int | None):
        self.registry = registry
        self.digest = digest
        self.size = size
        self.declared = size is not None
        self.offset = 0
        self.resumes = 0  # how many times a broken download was picked up again
        self.resp: urllib3.BaseHTTPResponse | None = None
        self.skip = 0  # bytes of the answer to throw away: a 200 to a resume sends them again
        self.complete = False  # the answer was read to its end, so its connection can be reused
        self.path = f"/v2/{registry.ref.repo}/blobs/{digest}"
        self.what = f"{registry.ref.host}/{registry.ref.repo}: blob"
        self.pace = Pace(registry.limits, f"{self.what} {digest}", digest, size)

    def _left(self) -> int | None:
        return None if self.size is None else self.size - self.offset

    def _mismatch(self, actual: str) -> BlobSizeMismatch:
        self._drop()
        return BlobSizeMismatch(self.what, self.digest, self.size, f"the registry sends {actual}")

    def _start(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        resp = self.registry.request("GET", self.path, headers, ok=(200, 206),
                                     timeout=self.pace.read_timeout())
        if resp.status == 404:
            resp.close()  # its body unread
            raise NotAnImage(f"{self.registry.ref.host}/{self.registry.ref.repo}: blob {self.digest} is missing")
        self.resp, self.skip, length = resp, self.offset, _length(resp)
        if resp.status == 206:
            span, _, total = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").partition("/")
            if span.split("-")[0] != str(self.offset):
                self._drop()
                raise RegistryError(f"{self.registry.ref.host}: blob {self.digest}: asked for bytes "
                                    f"{self.offset}-, got {resp.headers.get('Content-Range')!r}", self.digest)
            self.skip = 0
            if self.declared and total.isdigit() and int(total) != self.size:
                raise self._mismatch(f"{total} bytes")
            if self.declared and length is not None and length != self.size - self.offset:
                raise self._mismatch(f"{self.offset + length} bytes")
        elif self.size is None:
            self.size = length
        elif length is not None and length != self.size:
            raise self._mismatch(f"{length} bytes")  # refused before a byte of it is read

    def _read1(self, n: int) -> bytes:
        """What one read of the answer brings (at most n bytes), resuming a broken download."""
        breaks = 0
        while True:
            try:
                if self.resp is None:
                    began = time.monotonic()
                    try:
                        if breaks:
                            time.sleep(backoff(breaks - 1))
                        self._start()
                    finally:  # connecting and backing off run on the download's clock
                        self.pace.account(time.monotonic() - began, 0, self.offset, self._left())
                while self.skip:
                    data = self.pace.read1(self.resp, min(self.skip, READ_SIZE), self.offset, self._left())
                    if not data:
                        raise urllib3.exceptions.ProtocolError("connection closed early")
                    self.skip -= len(data)
                data = self.pace.read1(self.resp, n, self.offset, self._left())
                self.offset += len(data)
                if not data and self.size is not None and self.offset < self.size:
                    raise urllib3.exceptions.ProtocolError("connection closed early")
                return data
            except urllib3.exceptions.HTTPError as exc:
                self._drop()
                breaks += 1
                if breaks >= RETRIES:
                    raise RegistryError(f"{self.registry.ref.host}: blob {self.digest}: download broke "
                                        f"at byte {self.offset} {RETRIES} times ({_reason(exc)})",
                                        self.digest) from None
                self.resumes += 1

    def _end(self) -> None:
        """At the declared size: an answer of unknown length must end here, not go on."""
        if self.complete or self.resp is None:
            return
        if _length(self.resp) is None:
            try:
                more = self.pace.read1(self.resp, 1, self.offset, 0)
            except urllib3.exceptions.HTTPError:
                self._drop()  # cut after the last byte: all of it is here, the digest will judge
                return
            if more:
                raise self._mismatch(f"more than {self.size} bytes")
        self.complete = True

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (a default chunk when n < 0), fewer only at the end of the blob."""
        n = READ_SIZE if n is None or n < 0 else n
        parts, want = [], n
        while want > 0:
            if self.size is not None:
                want = min(want, self.size - self.offset)  # never read past what the blob may hold
                if want <= 0:
                    if self.declared:
                        self._end()
                    break
            data = self._read1(want)
            if not data:
                self.complete = True
                break
            parts.append(data)
            want -= len(data)
        return b"".join(parts)

    def _drop(self) -> None:
        if self.resp is not None:
            self.resp.close()  # a broken body: never hand this connection back to the pool
            self.resp = None

    def close(self) -> None:
        if self.resp is not None:
            done = self.complete or (self.size is not None and self.offset >= self.size
                                     and _length(self.resp) is not None)
            _release(self.resp, done)
            self.resp = None

    def __enter__(self) -> BinaryIO:
        return self  # type: ignore[return-value]

    def __exit__(self, *exc) -> None:
        self.close()

"""A registry client for pulls: the OCI distribution API over the project's urllib3 pool.

Manifests are read whole (they are small and bounded); blobs are streamed through
:class:`BlobReader`, which survives resets and 5xx answers by asking again for the rest of the
blob with a Range request. Nothing here trusts the registry's bytes: callers hash what they read
and compare with the digest they asked for (manifests here, layers in tarlayer.read_layer).

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

from lazyfs.errors import LayerDigestMismatch, NotAnImage, RegistryAuthError, RegistryError
from lazyfs.format import digest as digests

from imagebuilder.sources import regauth
from imagebuilder.sources.blobs import MAX_JSON
from imagebuilder.sources.dockerref import DockerRef
from imagebuilder.sources.oci import INDEX_TYPES, MANIFEST_TYPES

# One request is tried this many times on a connection error or a 429/5xx, and a blob download
# resumes this many times in a row without progress, waiting BACKOFF_FIRST·2ⁿ (at most
# BACKOFF_MAX) seconds between tries: about 12 s in all, long enough for a registry restart.
RETRIES = 6
BACKOFF_FIRST, BACKOFF_MAX = 0.25, 4.0
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
TIMEOUT = urllib3.Timeout(connect=10.0, read=60.0)
READ_SIZE = 1 << 20
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


def _drain(resp) -> str:
    """Read a failed answer's (bounded) body, free the connection, return its error text."""
    try:
        body = resp.read(65536)
    except urllib3.exceptions.HTTPError:
        body = b""
    resp.release_conn()
    return _error_text(body, resp.reason)


class Registry:
    """One repository on one registry, with its credentials and its auth state."""

    def __init__(self, ref: DockerRef, creds: regauth.Credentials | None = None,
                 tls_verify: bool = True, env: dict | None = None):
        self.ref = ref
        self.creds = creds or regauth.lookup(ref.host, ref.repo, env)
        self.tls_verify = tls_verify
        self.scope = f"repository:{ref.repo}:pull"
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=8, timeout=TIMEOUT,
                                        cert_reqs="CERT_REQUIRED" if tls_verify else "CERT_NONE")
        # A registry may redirect blobs to its storage (S3, a CDN); urllib3 drops Authorization
        # on a redirect to another host. Failures are retried by us, not urllib3.
        self.follow = urllib3.Retry(total=8, connect=0, read=0, status=0, other=0, redirect=8)
        # https first; plain HTTP only when the user turned verification off (podman's rule).
        self.schemes = ["https"] if tls_verify else ["https", "http"]
        self.authorization: str | None = None
        self.requests = 0

    # -- transport ----------------------------------------------------------------------------
    def _open(self, method: str, url: str, headers: dict) -> urllib3.BaseHTTPResponse:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            self.requests += 1
            return self.pool.request(method, url, headers=headers, retries=self.follow,
                                     preload_content=False)

    def _connect(self, method: str, path: str, headers: dict) -> urllib3.BaseHTTPResponse:
        """One try; the scheme is settled by the first request that gets an answer."""
        while True:
            url = f"{self.schemes[0]}://{self.ref.api_host}{path}"
            try:
                return self._open(method, url, headers)
            except urllib3.exceptions.MaxRetryError as exc:
                if isinstance(exc.reason, urllib3.exceptions.SSLError):
                    if len(self.schemes) > 1:
                        self.schemes.pop(0)  # --tls-verify=false: a plain-HTTP registry
                        continue
                    raise RegistryError(f"{self.ref.host}: TLS handshake failed ({exc.reason}); for a "
                                        "plain-HTTP registry, or one you trust without a valid "
                                        "certificate, pass --tls-verify=false") from None
                raise

    def request(self, method: str, path: str, headers: dict | None = None,
                ok: tuple[int, ...] = (200,)) -> urllib3.BaseHTTPResponse:
        """Send with auth, retrying connection errors and 429/5xx; the answer's body is unread.

        A 404 is returned to the caller (it knows what was missing); other failures raise."""
        authenticated = False
        failure = ""
        for attempt in range(RETRIES):
            hdrs = {"User-Agent": "lazyfs", **(headers or {})}
            if self.authorization:
                hdrs["Authorization"] = self.authorization
            try:
                resp = self._connect(method, path, hdrs)
            except urllib3.exceptions.HTTPError as exc:
                failure = _reason(exc)
                time.sleep(backoff(attempt))
                continue
            if resp.status in ok or resp.status == 404:
                return resp
            text = _drain(resp)
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
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                self.requests += 1
                resp = self.pool.request("GET", realm, fields=fields, headers=headers, retries=self.follow)
        except urllib3.exceptions.HTTPError as exc:
            raise RegistryError(f"{self.ref.host}: token service {realm} unreachable ({_reason(exc)})") from None
        if resp.status in (401, 403):
            who = f"credentials from {self.creds.source}" if self.creds else "no credentials"
            raise RegistryAuthError(f"{self.ref.host}: token service {realm} refused {who} for "
                                    f"{self.scope} (HTTP {resp.status})")
        try:
            body = json.loads(resp.data[:MAX_JSON])
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if resp.status != 200 or not isinstance(token, str) or not token:
            raise RegistryAuthError(f"{self.ref.host}: token service {realm} gave no token "
                                    f"(HTTP {resp.status})")
        return token

    # -- the distribution API -------------------------------------------------------------------
    def manifest(self, reference: str) -> tuple[bytes, str | None, str]:
        """(bytes, media type, digest) of a manifest or index by tag or digest, verified when the
        reference is a digest."""
        path = f"/v2/{self.ref.repo}/manifests/{reference}"
        resp = self.request("GET", path, {"Accept": ACCEPT})
        if resp.status == 404:
            raise NotAnImage(f"{self.ref.host}/{self.ref.repo}: no manifest {reference} "
                             f"(HTTP 404 {_drain(resp)})")
        try:
            data = resp.read(MAX_JSON + 1)
        except urllib3.exceptions.HTTPError as exc:
            raise RegistryError(f"{self.ref.host}: reading manifest {reference}: {exc}") from None
        finally:
            resp.release_conn()
        if len(data) > MAX_JSON:
            raise RegistryError(f"{self.ref.host}: manifest {reference} is larger than {MAX_JSON} bytes")
        actual = digests.compute(data)
        if digests.is_valid(reference) and actual != reference:
            raise LayerDigestMismatch(f"{self.ref.host}/{self.ref.repo}: manifest", reference, actual)
        media = (resp.headers.get("Content-Type") or "").split(";")[0].strip() or None
        return data, media, actual

    def blob_size(self, digest: str) -> int | None:
        """The blob's size from a HEAD, or None if the registry has no such blob."""
        resp = self.request("HEAD", f"/v2/{self.ref.repo}/blobs/{digest}")
        resp.release_conn()
        if resp.status == 404:
            return None
        length = resp.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else None

    def blob(self, digest: str, size: int | None = None) -> "BlobReader":
        return BlobReader(self, digest, size)


class BlobReader:
    """A blob as a file to read once, front to back. Breaks are resumed with a Range request;
    a registry that ignores Range sends the whole blob again and the part already read is skipped."""

    def __init__(self, registry: Registry, digest: str, size: int | None):
        self.registry = registry
        self.digest = digest
        self.size = size
        self.offset = 0
        self.resumes = 0  # how many times a broken download was picked up again
        self.resp: urllib3.BaseHTTPResponse | None = None
        self.path = f"/v2/{registry.ref.repo}/blobs/{digest}"

    def _start(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        resp = self.registry.request("GET", self.path, headers, ok=(200, 206))
        if resp.status == 404:
            resp.release_conn()
            raise NotAnImage(f"{self.registry.ref.host}/{self.registry.ref.repo}: blob {self.digest} is missing")
        skip = self.offset
        if resp.status == 206:
            start = (resp.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
            if start != str(self.offset):
                resp.release_conn()
                raise RegistryError(f"{self.registry.ref.host}: blob {self.digest}: asked for bytes "
                                    f"{self.offset}-, got {resp.headers.get('Content-Range')!r}")
            skip = 0
        elif self.size is None and resp.headers.get("Content-Length", "").isdigit():
            self.size = int(resp.headers["Content-Length"])
        while skip:  # a 200 to a resume: the part we already have comes again first
            skip -= len(resp.read(min(skip, READ_SIZE)) or b"\0" * skip)
        self.resp = resp

    def read(self, n: int = -1) -> bytes:
        n = READ_SIZE if n is None or n < 0 else n
        if self.size is not None:
            n = min(n, self.size - self.offset)  # never read past what the blob may hold
            if n <= 0:
                return b""
        stalled = 0
        while True:
            try:
                if self.resp is None:
                    self._start()
                data = self.resp.read(n)
                if not data and self.size is not None and self.offset < self.size:
                    raise urllib3.exceptions.ProtocolError("connection closed early")
                self.offset += len(data)
                return data
            except urllib3.exceptions.HTTPError as exc:
                self._drop()
                stalled += 1
                if stalled >= RETRIES:
                    raise RegistryError(f"{self.registry.ref.host}: blob {self.digest}: download broke "
                                        f"at byte {self.offset} {RETRIES} times ({_reason(exc)})") from None
                self.resumes += 1
                time.sleep(backoff(stalled - 1))

    def _drop(self) -> None:
        if self.resp is not None:
            self.resp.close()  # a broken body: never hand this connection back to the pool
            self.resp = None

    def close(self) -> None:
        if self.resp is not None:
            self.resp.release_conn() if self.size is not None and self.offset >= self.size else self.resp.close()
            self.resp = None

    def __enter__(self) -> BinaryIO:
        return self  # type: ignore[return-value]

    def __exit__(self, *exc) -> None:
        self.close()

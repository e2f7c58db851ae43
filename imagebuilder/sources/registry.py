"""A registry client for pulls: the OCI distribution API over the project's urllib3 pool.

Manifests are read whole (they are small and bounded); blobs are streamed through
:class:`~imagebuilder.sources.download.BlobReader`, which survives resets and 5xx answers by
asking again for the rest of the blob with a Range request. Nothing here trusts the registry's bytes: callers hash what they read
and compare with the digest they asked for (manifests here, layers in tarlayer.read_layer), every
body is read up to a bound (a blob's declared size, MAX_JSON, MAX_TOKEN), and every read is held
to the progress rule of :class:`~imagebuilder.sources.download.Pace`, so no answer can make a build wait forever.

Why hand-written rather than oras-py or skopeo: oras-py downloads a blob whole to a file before
anyone can read it, and `skopeo copy` writes the whole image to disk first (the two-step path this
source replaces). Neither streams into the layer reader, and both would add a second HTTP stack
beside urllib3, which the HTTP store already uses. docs/registry.md has the numbers.
"""
from __future__ import annotations

import json
import time
import warnings
from urllib.parse import urlparse

import urllib3

from lazyfs.errors import (BlobSizeMismatch, DownloadStalled, LayerDigestMismatch, NotAnImage,
                           RegistryAuthError, RegistryError)
from lazyfs.format import digest as digests
from lazyfs.format.guard import JSON_ERRORS

from imagebuilder.sources import regauth
from imagebuilder.sources.blobs import MAX_JSON
from imagebuilder.sources.dockerref import DockerRef
from imagebuilder.sources.download import (RETRIES, RETRY_STATUS, BlobReader, Pace, backoff, read_body,
                                           reason)
from imagebuilder.sources.model import DownloadLimits
from imagebuilder.sources.oci import INDEX_TYPES, MANIFEST_TYPES

CONNECT_TIMEOUT = 10.0
# A token answer is a JSON object with a JWT of a few KiB (more with a certificate chain in x5c).
MAX_TOKEN = 1 << 20
ERROR_BODY = 65536  # what is read of a failed answer's body, for its message
ACCEPT = ", ".join(sorted(MANIFEST_TYPES | INDEX_TYPES))


def _error_text(body: bytes, http_reason: str | None) -> str:
    """The first message of a distribution error body, or the HTTP reason."""
    try:
        first = (json.loads(body or b"{}").get("errors") or [])[0]
        return f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except (*JSON_ERRORS, AttributeError, IndexError, TypeError):
        return http_reason or ""


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
                failure = reason(exc)
                time.sleep(backoff(attempt))
                continue
            if resp.status in ok or resp.status == 404:
                return resp
            text = self._drain(resp)
            if resp.status == 401 and not authenticated:
                answered = urlparse(resp.geturl() or "").netloc.lower()
                if answered and answered != self.ref.api_host.lower():
                    # A redirect target (a blob store, a CDN) asking for credentials: its
                    # challenge could name any token service, and the registry's credentials
                    # are the registry's alone.
                    raise RegistryAuthError(f"{self.ref.host}: {method} {path}: {answered}, where the "
                                            "registry redirected, asks for credentials; not sending "
                                            "the registry's")
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
        scheme = urlparse(realm).scheme.lower()
        if scheme not in ("http", "https"):
            raise RegistryAuthError(f"{self.ref.host}: token service {realm[:80]!r} is not an HTTP(S) URL")
        if scheme == "http" and self.tls_verify:
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
            raise RegistryError(f"{what} unreachable ({reason(exc)})") from None
        if len(data) > MAX_TOKEN:
            raise RegistryAuthError(f"{what} answered more than {MAX_TOKEN} bytes")
        try:
            body = json.loads(data)
            token = body.get("token") or body.get("access_token")
        except (*JSON_ERRORS, AttributeError):
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
            raise RegistryError(f"{self.ref.host}: reading manifest {reference}: {reason(exc)}",
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

    def blob_head(self, digest: str) -> tuple[bool, int | None]:
        """Whether the registry has the blob, and its size where the HEAD said it (a proxy or a
        CDN may leave Content-Length out; the download is then held to the descriptor's)."""
        resp = self.request("HEAD", f"/v2/{self.ref.repo}/blobs/{digest}")
        resp.read(1)  # closes the answer, so its connection can carry the next request
        resp.release_conn()
        if resp.status == 404:
            return False, None
        length = resp.headers.get("Content-Length")
        return True, int(length) if length and length.isdigit() else None

    def blob(self, digest: str, size: int | None = None) -> "BlobReader":
        """The blob to stream; ``size`` is the size its descriptor declares, which the download is
        held to (None: whatever Content-Length says, unchecked)."""
        return BlobReader(self, digest, size)

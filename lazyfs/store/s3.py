"""A store in an S3 bucket (``s3://BUCKET/PREFIX``), through boto3. Layout in docs/format.md, "S3 store".

Endpoint, region and credentials come from the standard AWS chain (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ~/.aws/config, ...). botocore's "standard" retry mode retries throttling and 5xx
answers with exponential backoff and jitter; s3transfer does multipart uploads of large objects.
Objects are immutable and named by digest, so S3's atomic PUT gives the same guarantee as the local
store's temp+rename: a reader sees a whole object or none.
"""
from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Iterable, Iterator
from urllib.parse import urlparse

from lazyfs.errors import (BlockNotFound, FormatError, ManifestNotFound, NotFound, StoreError, StoreUnavailable,
                           TagNotFound)
from lazyfs.format import digest as digests
from lazyfs.format import reference
from lazyfs.format.block import MAX_FRAME_SIZE
from lazyfs.format.manifest import MAX_MANIFEST_FRAME
from lazyfs.store import lease
from lazyfs.store.base import SMALL, ObjectInfo, get_blocks_one_by_one
from lazyfs.store.parallel import parallel_puts

MULTIPART_THRESHOLD = 8 * 1024 * 1024
UPLOAD_THREADS = 16
_MISSING = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def parse_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StoreError(f"not an S3 store URL: {url!r} (use s3://BUCKET/PREFIX)")
    prefix = parsed.path.strip("/")
    return parsed.netloc, (prefix + "/") if prefix else ""


class S3Store:
    def __init__(self, url: str, client=None, threads: int = UPLOAD_THREADS):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        if client is None:
            session = boto3.session.Session()
            config = Config(retries={"mode": "standard", "max_attempts": 6},
                            max_pool_connections=max(threads, 10), connect_timeout=5, read_timeout=60,
                            region_name=session.region_name or "us-east-1")
            client = session.client("s3", config=config)
        self.client = client
        self.threads = threads
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                       multipart_chunksize=MULTIPART_THRESHOLD, max_concurrency=4)

    # -- keys -------------------------------------------------------------------------------------
    def _block_key(self, digest: str) -> str:
        return f"{self.prefix}blocks/sha256/{digests.hex_part(digest)}"

    def _manifest_key(self, digest: str) -> str:
        return f"{self.prefix}manifests/sha256/{digests.hex_part(digest)}"

    def _tag_key(self, name: str, tag: str) -> str:
        ref = reference.parse(f"{name}:{tag}")
        return f"{self.prefix}tags/{ref.name}/:{ref.tag}"

    def _lease_key(self, name: str) -> str:
        return f"{self.prefix}leases/{lease.check_name(name)}"

    # -- primitives -------------------------------------------------------------------------------
    @contextmanager
    def _errors(self, what: str, missing: NotFound | None = None):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING and missing is not None:
                raise missing from None
            if code == "NoSuchBucket":
                raise StoreError(f"{self.url}: bucket {self.bucket!r} does not exist") from None
            if code in _DENIED:
                raise StoreUnavailable(f"{self.url}: {what}: access denied ({code}); check the "
                                       f"AWS credentials") from None
            raise StoreUnavailable(f"{self.url}: {what}: {code or exc}") from None
        except BotoCoreError as exc:  # connection refused, timeouts, no credentials, ...
            raise StoreUnavailable(f"{self.url}: {what}: {exc}") from None

    def _get(self, key: str, missing: NotFound, limit: int = SMALL) -> bytes:
        """The object's bytes; one larger than ``limit`` (no block or record is) is refused
        before its body is read, not held whole in memory to fail its check."""
        with self._errors(f"GET {key}", missing):
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
            data = answer["Body"].read(limit + 1)  # (a Content-Length is not always given)
            if len(data) > limit:
                answer["Body"].close()
                # Wrong bytes, not an outage: asked again, the store gives the same object.
                raise FormatError(f"{self.url}: GET {key}: more than the {limit} bytes such an object "
                                  "may have")
            return data

    def _head(self, key: str) -> int | None:
        with self._errors(f"HEAD {key}"):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
            except Exception as exc:  # noqa: BLE001 - only "not found" is an answer here
                if _code(exc) in _MISSING:
                    return None
                raise

    def _put_new(self, key: str, data: bytes) -> bool:
        """Upload unless present; False when it was. Small objects use one conditional PUT
        (If-None-Match: *); large ones a multipart upload after a HEAD (a race only re-uploads the
        same bytes, which content addressing makes harmless)."""
        from botocore.exceptions import ClientError

        with self._errors(f"PUT {key}"):
            if len(data) < MULTIPART_THRESHOLD:
                try:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
                except ClientError as exc:
                    if _code(exc) in ("PreconditionFailed", "412"):
                        return False
                    if _code(exc) not in ("ConditionalRequestConflict", "409"):
                        raise
                    # Another upload of the key is under way, and may yet fail: these same
                    # bytes are put without the condition, so that the key holds them either way.
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
                return True
            if self._head(key) is not None:
                return False
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, key, Config=self.transfer)
            return True

    def _put(self, key: str, data: bytes) -> None:
        with self._errors(f"PUT {key}"):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def _delete(self, key: str) -> None:
        with self._errors(f"DELETE {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def _list(self, prefix: str) -> Iterator[dict]:
        with self._errors(f"LIST {prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix)
            for page in pages:
                yield from page.get("Contents", ())

    def _list_digests(self, prefix: str) -> Iterator[ObjectInfo]:
        for obj in self._list(prefix):
            digest = "sha256:" + obj["Key"].rsplit("/", 1)[-1]
            if digests.is_valid(digest):
                yield ObjectInfo(digest, obj["Size"], obj["LastModified"].timestamp())

    # -- the BlockStore protocol --------------------------------------------------------------------
    def remove_if_unused(self) -> None:
        pass  # check() creates nothing here

    def check(self, write: bool = False) -> None:
        with self._errors("checking the bucket", NotFound(self.bucket)):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except Exception as exc:  # noqa: BLE001 - HEAD answers a missing bucket with a bare 404
                if _code(exc) in _MISSING:
                    raise StoreError(f"{self.url}: bucket {self.bucket!r} does not exist "
                                     f"(create it first, e.g. aws s3 mb s3://{self.bucket})") from None
                raise

    def has_block(self, digest: str) -> bool:
        return self._head(self._block_key(digest)) is not None

    def block_size(self, digest: str) -> int | None:
        return self._head(self._block_key(digest))

    def get_block(self, digest: str) -> bytes:
        return self._get(self._block_key(digest), BlockNotFound(digest), MAX_FRAME_SIZE)

    def get_blocks(self, wanted: list[str]) -> Iterator[tuple[str, bytes | None]]:
        return get_blocks_one_by_one(self, wanted)

    def put_block(self, digest: str, frame: bytes) -> bool:
        return self._put_new(self._block_key(digest), frame)

    def put_blocks(self, items: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, bool]]:
        return parallel_puts(self.put_block, items, self.threads)

    def list_blocks(self) -> Iterator[ObjectInfo]:
        return self._list_digests("blocks/sha256/")

    def delete_block(self, digest: str) -> None:
        self._delete(self._block_key(digest))

    def get_manifest(self, digest: str) -> bytes:
        return self._get(self._manifest_key(digest), ManifestNotFound(digest), MAX_MANIFEST_FRAME)

    def put_manifest(self, digest: str, frame: bytes) -> bool:
        return self._put_new(self._manifest_key(digest), frame)

    def list_manifests(self) -> Iterator[ObjectInfo]:
        return self._list_digests("manifests/sha256/")

    def delete_manifest(self, digest: str) -> None:
        self._delete(self._manifest_key(digest))

    def get_tag(self, name: str, tag: str) -> str:
        value = self._get(self._tag_key(name, tag), TagNotFound(f"{name}:{tag}", self.url))
        text = value.decode("ascii", "replace").strip()
        if not digests.is_valid(text):
            raise StoreError(f"tag {name}:{tag} in {self.url} is corrupt: {text[:80]!r}")
        return text

    def put_tag(self, name: str, tag: str, digest: str) -> None:
        digests.validate(digest)
        self._put(self._tag_key(name, tag), (digest + "\n").encode())

    def list_tags(self) -> list[tuple[str, str, str]]:
        out = []
        base = self.prefix + "tags/"
        for obj in self._list("tags/"):
            name, _, tag = obj["Key"][len(base):].rpartition("/:")
            if name and tag:
                out.append((name, tag, self.get_tag(name, tag)))
        return sorted(out)

    def put_lease(self, name: str, data: bytes) -> None:
        self._put(self._lease_key(name), data)

    def list_leases(self) -> list[tuple[str, bytes]]:
        out = []
        for obj in self._list("leases/"):
            name = obj["Key"].rsplit("/", 1)[-1]
            try:
                out.append((name, self._get(obj["Key"], NotFound(name))))
            except NotFound:
                continue  # released between listing and reading
        return sorted(out)

    def delete_lease(self, name: str) -> None:
        self._delete(self._lease_key(name))

    def close(self) -> None:
        self.client.close()

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

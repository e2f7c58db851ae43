"""`lazyfs build` against a registry that misbehaves on purpose (tests/hostileregistry.py) and
against root filesystems with extreme trees: every build ends on its own, within a bound, with at
most one line of error and no traceback, in bounded memory, and leaves no store behind.

The download limits are set low here (a 1 s stall timeout, 4 KiB/s over 2 s windows) so the slow
cases are fast; the defaults users get are docs/registry.md's."""
from __future__ import annotations

import base64
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from bench.servers import lazyfs_cli, lazyfs_cli_peak
from imagebuilder.ociwriter import TarEntry
from lazyfs.format.block import MAX_BLOCK_SIZE
from tests.hostile import BASE
from tests.hostileregistry import CONFIG, HostileRegistry, digest_of, layer, zeros_bomb

INSECURE = "--tls-verify=false"
LIMITS = {"LAZYFS_REGISTRY_STALL_TIMEOUT": "1s", "LAZYFS_REGISTRY_MIN_RATE": "4k",
          "LAZYFS_REGISTRY_RATE_WINDOW": "2s"}
# A build's peak RSS is 33 to 49 MiB here whatever the registry sends (49: a manifest read to its
# 8 MiB limit); every hostile body below is at least 50 MiB, so one held whole would cross this.
PEAK = 64 << 20
MIB = 1 << 20


def _env(tmp: Path) -> dict:
    """No credentials from this machine's auth files; the low download limits."""
    return {"HOME": str(tmp / "home"), "XDG_RUNTIME_DIR": str(tmp / "run"), "REGISTRY_AUTH_FILE": "",
            **LIMITS}


@dataclass
class Case:
    # Fills the registry (and starts any other server on the stack); returns extra build arguments.
    setup: Callable[[HostileRegistry, contextlib.ExitStack], list[str]]
    expect: str | None  # the error's text, or None: the build must succeed
    seconds: float = 8.0  # the most the build may take
    check: Callable[[HostileRegistry], None] | None = None


def _first_layer(reg: HostileRegistry) -> tuple[str, bytes]:
    """An image of one small layer; the layer's (blob path, bytes)."""
    data = layer(BASE + [TarEntry("big", bytes(range(256)) * 4096)])
    digest = reg.image([data])["layers"][0]["digest"]
    return reg.blob_path(digest), data


def _answer_layer(make: Callable[[HostileRegistry, bytes], Callable]) -> Callable:
    """A setup whose one layer is answered by ``make(registry, honest bytes)``."""
    def setup(reg: HostileRegistry, stack) -> list[str]:
        path, data = _first_layer(reg)
        reg.answers[path] = make(reg, data)
        return []
    return setup


def _layer_declared_small(answer: Callable[[HostileRegistry], Callable]) -> Callable:
    """A manifest that says its layer is 10 bytes; the registry answers for it with ``answer``."""
    def setup(reg: HostileRegistry, stack) -> list[str]:
        doc = reg.image([layer(BASE)])
        doc["layers"][0]["size"] = 10
        reg.manifest(doc)
        reg.answers[reg.blob_path(doc["layers"][0]["digest"])] = answer(reg)
        return []
    return setup


def _head_says(head: Callable, get: Callable) -> Callable:
    return lambda h, is_head: (head if is_head else get)(h, is_head)


def _answer_manifest(make: Callable[[HostileRegistry], Callable]) -> Callable:
    def setup(reg: HostileRegistry, stack) -> list[str]:
        reg.answers[reg.manifest_path("1")] = make(reg)
        return []
    return setup


def _big_config(declared: int) -> Callable:
    """A config of 100 MiB; its descriptor says ``declared`` bytes."""
    def setup(reg: HostileRegistry, stack) -> list[str]:
        doc = reg.image([layer(BASE)])
        digest = digest_of(b"a config that is never read")
        doc["config"] = {"mediaType": CONFIG, "digest": digest, "size": declared}
        reg.manifest(doc)
        reg.answers[reg.blob_path(digest)] = reg.sized(100 * MIB)
        return []
    return setup


def _tampered(reg: HostileRegistry, stack) -> list[str]:
    path, data = _first_layer(reg)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, other bytes: only the digest can tell
    reg.answers[path] = lambda h, head: h.send(200, b"" if head else bytes(flipped),
                                              {"Content-Length": str(len(data))})
    return []


def _redirect_loop(reg: HostileRegistry, stack) -> list[str]:
    path, _ = _first_layer(reg)
    reg.answers[path] = reg.redirect(reg.url(path))
    return []


def _token_answer(size: int) -> Callable:
    def setup(reg: HostileRegistry, stack) -> list[str]:
        _first_layer(reg)
        reg.auth = (f'Bearer realm="{reg.url("/token")}",service="hostile"', "Bearer never-issued")
        reg.answers["/token"] = reg.sized(size)
        return []
    return setup


def _basic_auth(reg: HostileRegistry, user: str = "alice", password: str = "s3cret") -> list[str]:
    reg.auth = ('Basic realm="hostile"', "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    return ["--creds", f"{user}:{password}"]


def _no_credentials(reg: HostileRegistry, stack) -> list[str]:
    _first_layer(reg)
    _basic_auth(reg)
    return []  # ...and none given, none in the (empty) auth files


def _redirect_elsewhere(reg: HostileRegistry, stack) -> list[str]:
    """Blobs served by another host (as a registry sends them to S3 or a CDN)."""
    args = _basic_auth(reg)
    path, data = _first_layer(reg)
    other = stack.enter_context(HostileRegistry(reg.repo))
    other.blobs[path.rpartition("/")[2]] = (data, "application/octet-stream")
    reg.answers[path] = lambda h, head: (h.send(200, b"", {"Content-Length": str(len(data))}) if head else
                                         reg.redirect(other.url(path), 307)(h, head))
    reg.peers.append(other)
    return args


def _no_credentials_went_elsewhere(reg: HostileRegistry) -> None:
    fetched = [s for s in reg.peers[0].seen if s.method == "GET" and "/blobs/" in s.path]
    assert fetched and all("Authorization" not in s.headers for s in fetched), reg.peers[0].seen
    asked = [s for s in reg.seen if s.method == "GET" and s.path == fetched[0].path]
    assert asked and all(s.headers.get("Authorization") == reg.auth[1] for s in asked)  # sent where it belongs


def _redirect_to_a_challenger(reg: HostileRegistry, stack) -> list[str]:
    """The blob's redirect target answers 401 with a token service of its own choosing."""
    args = _redirect_elsewhere(reg, stack)
    other = reg.peers[0]
    other.auth = (f'Bearer realm="{other.url("/token")}",service="evil"', "Bearer never-issued")
    return args


def _nothing_went_to_the_challenger(reg: HostileRegistry) -> None:
    seen = reg.peers[0].seen
    assert seen and all("Authorization" not in s.headers for s in seen), seen
    assert not any(s.path.startswith("/token") for s in seen), seen


def _bomb(reg: HostileRegistry, stack) -> list[str]:
    gz, diff_id = zeros_bomb(512 * MIB)  # in 512 KiB: memory must not care how much it inflates to
    reg.image([gz], diff_ids=[diff_id])
    return []


def _many_layers(reg: HostileRegistry, stack) -> list[str]:
    reg.image([layer(BASE)] * 10_000)  # one blob, read 10,000 times (distinct ones: 50% slower)
    return []


def _head_without_length(reg: HostileRegistry, stack) -> list[str]:
    """The layer's HEAD says it is there but not how big (a proxy or CDN in front); its GET is
    honest."""
    path, data = _first_layer(reg)
    reg.answers[path] = lambda h, head: h.stream(200, iter(()), {}, head=True) if head else \
        h.send(200, data, {"Content-Type": "application/octet-stream"})
    return []


CASES: dict[str, Case] = {
    # --- the download's progress rule -------------------------------------------------------------
    "stalled-blob": Case(_answer_layer(lambda reg, data: reg.stall_after(data, 10)),
                         "no data for 1 s at byte 10 (stall timeout)"),
    "trickling-blob": Case(_answer_layer(lambda reg, data: reg.trickle(data, 0.25)),
                           "under the minimum rate of 4096 bytes/s"),
    "silent-registry": Case(_answer_manifest(lambda reg: reg.silent()), "no answer in 1 s"),
    # --- sizes: the descriptor's bounds what is read ------------------------------------------------
    "layer-bigger-than-descriptor": Case(_layer_declared_small(lambda reg: reg.sized(50 * MIB)),
                                         "the blob is 52428800 bytes, its descriptor says 10 bytes"),
    "layer-bigger-than-descriptor-and-head": Case(
        _layer_declared_small(lambda reg: _head_says(reg.sized(10), reg.sized(50 * MIB))),
        "the registry sends 52428800 bytes, its descriptor says 10 bytes"),
    "layer-bigger-than-descriptor-unframed": Case(
        _layer_declared_small(lambda reg: _head_says(reg.sized(10), reg.sized(50 * MIB, length=-1))),
        "the registry sends more than 10 bytes, its descriptor says 10 bytes"),
    "manifest-200mib": Case(_answer_manifest(lambda reg: reg.sized(200 * MIB)), "larger than 8388608 bytes"),
    "manifest-endless": Case(_answer_manifest(lambda reg: reg.endless()), "larger than 8388608 bytes"),
    "config-100mib": Case(_big_config(100 * MIB), "more than the 8388608 a JSON document may have"),
    "config-bigger-than-descriptor": Case(_big_config(1000), "the blob is 104857600 bytes, its descriptor "
                                                             "says 1000 bytes"),
    "manifest-nested-past-the-stack": Case(_answer_manifest(lambda reg: lambda h, head: h.send(
        200, b"[" * 100_000, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})), "is not valid JSON"),
    "token-answer-100mib": Case(_token_answer(100 * MIB), "answered more than 1048576 bytes"),
    # --- other refusals ---------------------------------------------------------------------------
    "redirect-loop": Case(_redirect_loop, "too many redirects"),
    "blob-digest-mismatch": Case(_tampered, "content hashes to"),
    "missing-credentials": Case(_no_credentials, "no credentials found"),
    "redirect-target-asks-for-credentials": Case(_redirect_to_a_challenger, "asks for credentials; not "
                                                 "sending the registry's", check=_nothing_went_to_the_challenger),
    # --- accepted ---------------------------------------------------------------------------------
    "blob-redirected-to-another-host": Case(_redirect_elsewhere, None, check=_no_credentials_went_elsewhere),
    "head-without-content-length": Case(_head_without_length, None),
    "gzip-bomb-512mib-of-zeros": Case(_bomb, None, seconds=30),
    "10000-layers": Case(_many_layers, None, seconds=45),
}


def _one_line_error(proc, expect: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lazyfs: error: "), proc.stderr
    assert expect in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_registry(name, tmp_path):
    case = CASES[name]
    store, staging = tmp_path / "store", tmp_path / "staging"
    staging.mkdir()
    with contextlib.ExitStack() as stack:
        reg = stack.enter_context(HostileRegistry())
        args = case.setup(reg, stack)
        began = time.monotonic()
        proc, peak = lazyfs_cli_peak("build", reg.ref(), INSECURE, "--store", store, "--tmp-dir", staging,
                                     *args, env=_env(tmp_path), check=False, timeout=case.seconds + 60)
        took = time.monotonic() - began
        if case.check:
            case.check(reg)
    print(f"{name}: {took:.1f} s, peak RSS {peak / MIB:.0f} MiB")
    if case.expect is None:
        assert proc.returncode == 0, proc.stderr
        assert any(p.is_file() for p in (store / "manifests").rglob("*"))
    else:
        _one_line_error(proc, case.expect)
        assert not store.exists()  # not even the directory: the store was this build's to make
    assert took < case.seconds, f"{name} took {took:.1f} s"
    assert peak < PEAK, f"{name}: peak RSS {peak / MIB:.0f} MiB"
    assert list(staging.iterdir()) == []


def _chain(root: Path, name: str, depth: int) -> None:
    """``depth`` nested directories called ``name`` with a file at the bottom, made through
    directory descriptors: the whole path may be longer than the kernel takes in one call."""
    fd = os.open(root, os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            fd, parent = os.open(name, os.O_DIRECTORY, dir_fd=fd), fd
            os.close(parent)
        os.close(os.open("bottom", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    finally:
        os.close(fd)


def _unchain(root: Path, name: str) -> None:
    """Remove what _chain made, deepest first, without a path longer than one name (pytest's
    recursive rmtree would run out of stack on it)."""
    fds = [os.open(root, os.O_DIRECTORY)]
    try:
        while os.path.exists(f"/proc/self/fd/{fds[-1]}/{name}"):
            fds.append(os.open(name, os.O_DIRECTORY, dir_fd=fds[-1]))
        os.unlink("bottom", dir_fd=fds[-1])
        while len(fds) > 1:
            os.close(fds.pop())
            os.rmdir(name, dir_fd=fds[-1])
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("name, depth, expect", [
    ("d", 1000, "nested deeper than 256 levels"),
    ("n" * 255, 20, "is longer than this host's PATH_MAX (4096)"),  # long before too deep
], ids=["1000-level-chain", "5100-byte-path"])
def test_extreme_tree_is_one_line(name, depth, expect, tmp_path):
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    store = tmp_path / "store"
    _chain(rootfs, name, depth)
    try:
        began = time.monotonic()
        proc = lazyfs_cli("build", f"dir:{rootfs}", "--store", store, check=False, timeout=60)
        took = time.monotonic() - began
    finally:
        _unchain(rootfs, name)
    _one_line_error(proc, expect)
    assert took < 10 and not store.exists()


@pytest.mark.parametrize("size", [0, -1, MAX_BLOCK_SIZE + 1])
def test_out_of_range_chunk_size_is_one_line(size, tmp_path):
    (tmp_path / "rootfs").mkdir()
    proc = lazyfs_cli("build", f"dir:{tmp_path / 'rootfs'}", "--chunk-size", size, "--store",
                      tmp_path / "store", check=False)
    assert proc.returncode == 2 and not (tmp_path / "store").exists()
    assert proc.stderr.strip() == f"lazyfs: error: --chunk-size must be 1 to {MAX_BLOCK_SIZE} bytes, not {size}"

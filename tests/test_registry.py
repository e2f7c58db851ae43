"""`lazyfs build docker://…` against a real registry (Debian's docker-registry) on 127.0.0.1, with
images pushed by skopeo: round trip, platforms, basic and bearer auth, faults, bounded memory."""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from bench.registry import RegistryServer, skip_reason
from bench.servers import lazyfs_cli, lazyfs_cli_peak
from imagebuilder.ociwriter import TarEntry, make_tar, write_layout
from imagebuilder.sources.oci import REF_NAME
from tests.images import _rand

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
INSECURE = "--tls-verify=false"


def _digest(proc) -> str:
    return proc.stdout.strip().splitlines()[-1]


def _store_is_empty(store: Path) -> bool:
    """Nothing published: no block, manifest or tag (an initialised empty store is fine)."""
    return not any(p.is_file() for sub in ("blocks", "manifests", "tags") for p in (store / sub).rglob("*"))


@pytest.fixture
def registry(tmp_path):
    with RegistryServer(tmp_path / "registry") as reg:
        yield reg


def test_round_trip_equals_the_oci_build(umoci_image, registry, tmp_path):
    layout, _ = umoci_image
    registry.push(f"oci:{layout}:test", "rt/umoci:1")
    store = tmp_path / "store"
    from_layout = _digest(lazyfs_cli("build", f"oci:{layout}:test", "--store", store))
    pulled = lazyfs_cli("build", f"docker://{registry.host}/rt/umoci:1", INSECURE, "--store", store,
                        "--tag", "rt/umoci:1")
    assert _digest(pulled) == from_layout
    info = json.loads(lazyfs_cli("inspect", "rt/umoci:1", "--store", store, "--json").stdout)
    src = info["source"]
    assert src["ref"] == f"docker://{registry.host}/rt/umoci:1" and src["platform"] == "linux/amd64"
    assert src["transport"] == "docker"
    skopeo = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                             f"docker://{registry.host}/rt/umoci:1"], capture_output=True, check=True)
    import hashlib
    assert src["manifest"] == "sha256:" + hashlib.sha256(skopeo.stdout).hexdigest()
    # Found by the source digest, alone or as a pinned reference, which also builds the same image.
    pinned = f"docker://{registry.host}/rt/umoci@{src['manifest']}"
    found = json.loads(lazyfs_cli("images", "--store", store, "--json", "--source", pinned).stdout)
    assert [row["digest"] for row in found["images"]] == [from_layout]
    assert _digest(lazyfs_cli("build", pinned, INSECURE, "--store", store)) == from_layout
    assert "rt/umoci:1" in lazyfs_cli("images", "--store", store).stdout


def _platform_layout(root: Path) -> Path:
    """An OCI layout tagged "multi": an index of a linux/amd64 and a linux/arm64/v8 image."""
    arm = write_layout(root / "arm", [make_tar([TarEntry("which", b"arm64\n")])], "x", platform="linux/arm64/v8")
    amd = write_layout(root / "amd", [make_tar([TarEntry("which", b"amd64\n")])], "x")
    blobs = amd / "blobs" / "sha256"
    entries = []
    for lay, plat in ((arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
                      (amd, {"os": "linux", "architecture": "amd64"})):
        desc = json.loads((lay / "index.json").read_text())["manifests"][0]
        for blob in (lay / "blobs" / "sha256").iterdir():
            (blobs / blob.name).write_bytes(blob.read_bytes())
        entries.append({k: v for k, v in desc.items() if k != "annotations"} | {"platform": plat})
    import hashlib
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()
    digest = "sha256:" + hashlib.sha256(index).hexdigest()
    (blobs / digest[7:]).write_bytes(index)
    (amd / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": len(index),
        "annotations": {REF_NAME: "multi"}}]}))
    return amd


def test_index_picks_the_platform(registry, tmp_path):
    layout = _platform_layout(tmp_path / "layouts")
    registry.push(f"oci:{layout}:multi", "multi/app:1", all_platforms=True)
    store = tmp_path / "store"
    ref = f"docker://{registry.host}/multi/app:1"
    amd = lazyfs_cli("build", ref, INSECURE, "--store", store, "--tag", "multi/app:amd64")
    arm = lazyfs_cli("build", ref, INSECURE, "--platform", "linux/arm64", "--store", store,
                     "--tag", "multi/app:arm64")
    assert _digest(amd) != _digest(arm)
    for tag, arch, plat in (("amd64", "amd64", "linux/amd64"), ("arm64", "arm64", "linux/arm64/v8")):
        info = json.loads(lazyfs_cli("inspect", f"multi/app:{tag}", "--store", store, "--json").stdout)
        assert info["config"]["architecture"] == arch and info["source"]["platform"] == plat
        assert info["source"]["index"] != info["source"]["manifest"]
    # The index digest a node is asked for finds the image built for its platform.
    index = json.loads(lazyfs_cli("inspect", "multi/app:amd64", "--store", store, "--json").stdout)["source"]["index"]
    found = json.loads(lazyfs_cli("images", "--store", store, "--json", "--source", index).stdout)
    assert {row["ref"] for row in found["images"]} <= {"multi/app:amd64", "multi/app:arm64"}
    missing = lazyfs_cli("build", ref, INSECURE, "--platform", "linux/s390x", "--store", tmp_path / "s2",
                         check=False)
    assert missing.returncode == 1
    line = missing.stderr.strip()
    assert "\n" not in line and "no image for platform linux/s390x" in line
    assert "linux/amd64" in line and "linux/arm64/v8" in line
    assert _store_is_empty(tmp_path / "s2")


def _htpasswd(path: Path, user: str, password: str) -> Path:
    subprocess.run(["htpasswd", "-Bbc", str(path), user, password], check=True, capture_output=True)
    return path


def _auth_file(path: Path, host: str, user: str, password: str) -> Path:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


def test_basic_auth_from_auth_files(tmp_path):
    if not os.path.exists("/usr/bin/htpasswd"):
        pytest.skip("htpasswd is not installed (Debian package apache2-utils)")
    src = write_layout(tmp_path / "l", [make_tar([TarEntry("etc/", type=b"5", mode=0o755),
                                                  TarEntry("etc/id", b"private\n")])], "v1")
    with RegistryServer(tmp_path / "reg", htpasswd=_htpasswd(tmp_path / "htpasswd", "alice", "s3cret")) as reg:
        reg.push(f"oci:{src}:v1", "team/private:1", creds="alice:s3cret")
        ref = f"docker://{reg.host}/team/private:1"
        expected = _digest(lazyfs_cli("build", f"oci:{src}:v1", "--store", tmp_path / "oci-store"))
        home = tmp_path / "home"
        env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(tmp_path / "run"), "REGISTRY_AUTH_FILE": ""}
        # podman's file (REGISTRY_AUTH_FILE), the runtime dir's, and docker's config, each alone.
        for name, extra in (("REGISTRY_AUTH_FILE", {"REGISTRY_AUTH_FILE": str(_auth_file(
                                tmp_path / "auth.json", reg.host, "alice", "s3cret"))}),
                            ("XDG_RUNTIME_DIR", {}), ("docker", {})):
            if name == "XDG_RUNTIME_DIR":
                _auth_file(tmp_path / "run" / "containers" / "auth.json", reg.host, "alice", "s3cret")
            if name == "docker":
                (tmp_path / "run" / "containers" / "auth.json").unlink()
                _auth_file(home / ".docker" / "config.json", f"https://{reg.host}", "alice", "s3cret")
            got = lazyfs_cli("build", ref, INSECURE, "--store", tmp_path / f"store-{name}", env={**env, **extra})
            assert _digest(got) == expected, name
        wrong = _auth_file(tmp_path / "wrong.json", reg.host, "alice", "guess")
        for args, env_extra in ((["--store", tmp_path / "bad1"], {"REGISTRY_AUTH_FILE": str(wrong)}),
                                (["--creds", "alice:nope", "--store", tmp_path / "bad2"], {})):
            r = lazyfs_cli("build", ref, INSECURE, *args, env={**env, **env_extra}, check=False)
            assert r.returncode == 1
            line = r.stderr.strip()
            assert "\n" not in line and reg.host in line and "repository:team/private:pull" in line
            assert "HTTP 401" in line
            assert _store_is_empty(Path(args[-1]))
        nocreds = lazyfs_cli("build", ref, INSECURE, "--store", tmp_path / "bad3",
                             env={**env, "HOME": str(tmp_path / "nobody")}, check=False)
        assert nocreds.returncode == 1 and "no credentials found" in nocreds.stderr


def test_bearer_token_flow(tmp_path):
    from tests.tokenissuer import TokenIssuer

    src = write_layout(tmp_path / "l", [make_tar([TarEntry("secret", b"behind a token\n")])], "v1")
    with TokenIssuer(tmp_path, "bob", "hunter2") as issuer, \
            RegistryServer(tmp_path / "reg", token=issuer.registry_config()) as reg:
        reg.push(f"oci:{src}:v1", "tok/app:1", creds="bob:hunter2")
        ref = f"docker://{reg.host}/tok/app:1"
        expected = _digest(lazyfs_cli("build", f"oci:{src}:v1", "--store", tmp_path / "oci-store"))
        issued = issuer.issued
        got = lazyfs_cli("build", ref, INSECURE, "--creds", "bob:hunter2", "--store", tmp_path / "store")
        assert _digest(got) == expected and issuer.issued > issued
        bad = lazyfs_cli("build", ref, INSECURE, "--creds", "bob:wrong", "--store", tmp_path / "bad",
                         check=False)
        line = bad.stderr.strip()
        assert bad.returncode == 1 and "\n" not in line
        assert "token service" in line and "repository:tok/app:pull" in line and reg.host in line
        assert _store_is_empty(tmp_path / "bad")
        # Without --tls-verify=false a plain-HTTP registry (and token realm) is refused.
        plain = lazyfs_cli("build", ref, "--creds", "bob:hunter2", "--store", tmp_path / "bad", check=False)
        assert plain.returncode == 1 and "--tls-verify=false" in plain.stderr


def test_tls_is_verified_by_default(tmp_path):
    from tests.tokenissuer import self_signed

    src = write_layout(tmp_path / "l", [make_tar([TarEntry("f", b"over tls\n")])], "v1")
    cert, key, _, _ = self_signed(tmp_path, "registry tls")
    with RegistryServer(tmp_path / "reg", tls=(cert, key)) as reg:
        reg.push(f"oci:{src}:v1", "tls/app:1")
        ref = f"docker://{reg.host}/tls/app:1"
        refused = lazyfs_cli("build", ref, "--store", tmp_path / "bad", check=False)
        assert refused.returncode == 1 and "TLS handshake failed" in refused.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr and _store_is_empty(tmp_path / "bad")
        trusted = lazyfs_cli("build", ref, "--store", tmp_path / "ok", env={"SSL_CERT_FILE": str(cert)})
        insecure = lazyfs_cli("build", ref, INSECURE, "--store", tmp_path / "ok2")
        assert _digest(trusted) == _digest(insecure)


class KillingRelay:
    """A TCP relay to the registry that, once it has passed ``after`` bytes of one answer, has the
    test SIGKILL and restart the registry mid-body, and cuts that connection there (on loopback
    the whole blob may already sit in socket buffers when the registry dies). It logs each
    request's first lines."""

    def __init__(self, upstream: tuple[str, int], after: int, on_trigger):
        self.upstream, self.after, self.on_trigger = upstream, after, on_trigger
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[str] = []
        self.triggered = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream)
        except OSError:
            client.close()
            return

        def up() -> None:
            while data := _recv(client):
                self.requests.append(data[:400].decode("latin-1"))
                server.sendall(data)
            _hang_up(server)

        threading.Thread(target=up, daemon=True).start()
        passed = 0
        while data := _recv(server):
            client.sendall(data)
            passed += len(data)
            if passed > self.after and not self.triggered:
                self.triggered = True
                self.on_trigger()  # the registry dies with this answer half sent...
                break  # ...and what its kernel had buffered dies with the connection
        for sock in (server, client):
            _hang_up(sock)

    def close(self) -> None:
        self.listener.close()


def _hang_up(sock: socket.socket) -> None:
    """shutdown() first: a bare close() leaves the connection up while another thread is in recv()."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def test_registry_killed_mid_layer_resumes_with_a_range_request(registry, tmp_path):
    big = _rand(24 << 20, 7)
    src = write_layout(tmp_path / "l", [make_tar([TarEntry("big.bin", big)])], "v1", compress=False)
    registry.push(f"oci:{src}:v1", "faults/big:1", compress=False)
    expected = _digest(lazyfs_cli("build", f"oci:{src}:v1", "--store", tmp_path / "oci-store"))

    def restart() -> None:
        registry.kill()
        registry.start()

    relay = KillingRelay(("127.0.0.1", registry.port), 4 << 20, restart)
    try:
        got = lazyfs_cli("build", f"docker://{relay.host}/faults/big:1", INSECURE, "--store", tmp_path / "store")
    finally:
        relay.close()
    assert relay.triggered and _digest(got) == expected
    assert any(r.startswith("GET ") and "/blobs/" in r and "Range: bytes=" in r for r in relay.requests)


def test_swapped_blob_is_a_digest_error_with_nothing_stored(registry, tmp_path):
    src = write_layout(tmp_path / "l", [make_tar([TarEntry("data.bin", _rand(1 << 20, 3))])], "v1")
    registry.push(f"oci:{src}:v1", "faults/swap:1")
    manifest = json.loads(subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                          f"docker://{registry.host}/faults/swap:1"],
                                         capture_output=True, check=True).stdout)
    layer = manifest["layers"][0]["digest"]
    blob = registry.blob_path(layer)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: what a bad disk or a tamperer leaves
    blob.write_bytes(bytes(data))
    r = lazyfs_cli("build", f"docker://{registry.host}/faults/swap:1", INSECURE, "--store", tmp_path / "store",
                   "--tag", "faults/swap:1", check=False)
    assert r.returncode != 0
    assert layer in r.stderr and "content hashes to" in r.stderr
    assert _store_is_empty(tmp_path / "store")


def test_memory_stays_bounded_for_a_big_layer(registry, tmp_path):
    """A 384 MiB layer streams through with peak RSS far below its size."""
    size = 384 << 20
    layer = tmp_path / "layer.tar"
    # Compressible (it crosses the wire quickly) but with distinct blocks (nothing dedups away).
    import tarfile
    with tarfile.open(layer, "w") as tf:
        info = tarfile.TarInfo("big.bin")
        info.size = size
        tf.addfile(info, _Counted(size))
    src = tmp_path / "big-layout"
    _layout_from_tar(src, layer)
    registry.push(f"oci:{src}:v1", "mem/big:1")
    _, peak = lazyfs_cli_peak("build", f"docker://{registry.host}/mem/big:1", INSECURE,
                              "--store", tmp_path / "store", timeout=300)
    print(f"peak RSS {peak >> 20} MiB for a {size >> 20} MiB layer")
    assert peak < 200 << 20, f"peak RSS {peak >> 20} MiB for a {size >> 20} MiB layer"


class _Counted:
    """``size`` bytes where every 64 KiB piece starts with its own number and is zeros after."""

    def __init__(self, size: int):
        self.size, self.pos = size, 0

    def read(self, n: int) -> bytes:
        n = min(n, self.size - self.pos)
        out = bytearray(n)
        first = -(-self.pos // 65536) * 65536
        for piece in range(first, self.pos + n, 65536):
            stamp = piece.to_bytes(8, "little")
            at = piece - self.pos
            out[at:at + 8] = stamp[:max(0, n - at)]
        self.pos += n
        return bytes(out)


def _layout_from_tar(root: Path, tar: Path) -> None:
    """An OCI layout whose one layer is ``tar``, gzipped by streaming (never read whole)."""
    import gzip
    import hashlib
    import shutil

    (root / "blobs" / "sha256").mkdir(parents=True)
    gz = root / "layer.gz"
    diff = hashlib.sha256()
    with open(tar, "rb") as f, gzip.GzipFile(gz, "wb", compresslevel=1, mtime=0) as z:
        while chunk := f.read(1 << 20):
            diff.update(chunk)
            z.write(chunk)
    blob = hashlib.sha256()
    with open(gz, "rb") as f:
        while chunk := f.read(1 << 20):
            blob.update(chunk)
    layer_digest = "sha256:" + blob.hexdigest()
    shutil.move(gz, root / "blobs" / "sha256" / blob.hexdigest())

    def put(doc: dict) -> dict:
        raw = json.dumps(doc).encode()
        d = hashlib.sha256(raw).hexdigest()
        (root / "blobs" / "sha256" / d).write_bytes(raw)
        return {"digest": "sha256:" + d, "size": len(raw)}

    config = put({"architecture": "amd64", "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff.hexdigest()]}})
    manifest = put({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                "digest": layer_digest, "size": (root / "blobs" / "sha256" / layer_digest[7:]).stat().st_size}]})
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
        "annotations": {REF_NAME: "v1"}}]}))

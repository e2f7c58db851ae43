"""A real registry for tests and benchmarks: Debian's `docker-registry` (distribution v2.8) on
127.0.0.1, its storage in a directory of ours, images pushed to it with skopeo.

Auth is the registry's own: ``htpasswd=`` a file of bcrypt entries (basic auth), or ``token=`` the
realm, service, issuer and certificate bundle of a token service (the bearer flow).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from bench.servers import _wait_http, free_port, stop

REGISTRY = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")


def skip_reason() -> str | None:
    if not REGISTRY:
        return "docker-registry is not installed (Debian package docker-registry; scripts/setup installs it)"
    if not SKOPEO:
        return "skopeo is not installed (Debian package skopeo)"
    return None


class RegistryServer:
    def __init__(self, workdir: Path, htpasswd: Path | None = None, token: dict | None = None,
                 tls: tuple[Path, Path] | None = None):
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.htpasswd, self.token, self.tls = htpasswd, token, tls
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "registry.log"

    def _config(self) -> Path:
        http: dict = {"addr": self.host, "secret": "lazyfs-test"}
        if self.tls:
            http["tls"] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
        config: dict = {
            "version": 0.1, "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": http}
        if self.htpasswd:
            config["auth"] = {"htpasswd": {"realm": "lazyfs-test", "path": str(self.htpasswd)}}
        if self.token:
            config["auth"] = {"token": self.token}
        path = self.workdir / "config.yml"
        path.write_text(json.dumps(config))  # YAML is a superset of JSON
        return path

    def start(self, timeout: float = 20.0) -> "RegistryServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self._config()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        scheme = "https" if self.tls else "http"
        if self.tls:  # urllib in _wait_http would refuse the test certificate; wait on the port
            _wait_tcp(self.host, self.proc, timeout, self.log)
        else:
            _wait_http(f"{scheme}://{self.host}/v2/", self.proc, timeout, self.log)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash: connections in flight break mid-body."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def push(self, source: str, dest: str, *, all_platforms: bool = False, creds: str | None = None,
             compress: bool = True) -> None:
        """``skopeo copy SOURCE docker://HOST/DEST``; ``compress=False`` keeps layers as they are."""
        args = [SKOPEO, "copy", "--quiet", "--dest-tls-verify=false"]
        if all_platforms:
            args.append("--all")
        if creds:
            args += ["--dest-creds", creds]
        if not compress:
            args.append("--dest-compress=false")
        proc = subprocess.run([*args, source, f"docker://{self.host}/{dest}"], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"skopeo push of {source} to {self.host}/{dest} failed: {proc.stderr.strip()}")

    def blob_path(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def __enter__(self) -> "RegistryServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _wait_tcp(host: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import socket
    import time

    addr, _, port = host.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"registry exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection((addr, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    stop(proc)
    raise RuntimeError(f"registry on {host}: no answer after {timeout:.0f}s")

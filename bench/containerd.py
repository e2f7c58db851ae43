"""A real containerd for tests and benchmarks: Debian's containerd 1.6 with its own root, state,
socket and config, the lazyfs snapshotter as a proxy plugin, and its CRI plugin set to pull
through a snapshotter (lazyfs, or containerd's own overlayfs), as a Kubernetes node's kubelet
would, plus a CRI PullImage client and `ctr`."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CONTAINERD = shutil.which("containerd")
CTR = shutil.which("ctr")
NAMESPACE = "k8s.io"  # the CRI plugin's namespace


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "containerd and the snapshotter need root"
    if not CONTAINERD or not CTR:
        return "containerd is not installed (Debian package containerd; scripts/setup installs it)"
    from lazyfs.errors import SnapshotterUnavailable
    from lazyfs.snapshotter import proto
    try:
        proto.load()
    except SnapshotterUnavailable as exc:
        return str(exc)
    return None


def config(workdir: Path, sockets: Path, snapshotter_socket: Path, registry_host: str,
           cri_snapshotter: str) -> str:
    return f"""version = 2
root = "{workdir}/root"
state = "{workdir}/state"

[grpc]
  address = "{sockets}/containerd.sock"

[ttrpc]
  address = "{sockets}/containerd.sock.ttrpc"

[proxy_plugins]
  [proxy_plugins.lazyfs]
    type = "snapshot"
    address = "{snapshotter_socket}"

[plugins."io.containerd.grpc.v1.cri"]
  disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{cri_snapshotter}"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry_host}"]
    endpoint = ["http://{registry_host}"]
"""


class Containerd:
    def __init__(self, workdir: Path, snapshotter_socket: Path, registry_host: str,
                 cri_snapshotter: str = "lazyfs"):
        self.workdir = workdir
        # containerd refuses Unix socket paths over 104 bytes: its sockets live in a short directory.
        self.sockets = Path(tempfile.mkdtemp(prefix="lzctrd-", dir="/run"))
        self.socket = self.sockets / "containerd.sock"
        self.log = workdir / "containerd.log"
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.toml").write_text(config(workdir, self.sockets, snapshotter_socket,
                                                    registry_host, cri_snapshotter))

    def start(self, timeout: float = 30.0) -> "Containerd":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([CONTAINERD, "--config", str(self.workdir / "config.toml")],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            if self.socket.exists() and self.ctr("version", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"containerd did not answer within {timeout:.0f} s: {self.log.read_text()[-2000:]}")

    def ctr(self, *args, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([CTR, "-a", str(self.socket), "-n", NAMESPACE, *map(str, args)],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(map(str, args))} failed ({proc.returncode}): "
                                 f"{proc.stderr.strip()}\n{proc.stdout.strip()}")
        return proc

    def cri_pull(self, ref: str, timeout: float = 120) -> str:
        """CRI ImageService.PullImage, as the kubelet asks for an image: the image ID it answers."""
        import grpc
        with grpc.insecure_channel(f"unix://{self.socket}") as channel:
            pull = channel.unary_unary("/runtime.v1.ImageService/PullImage",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)
            answer = pull(_pull_request(ref), timeout=timeout)
        return _string_field(answer, 1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        for mp in sorted(_mounts_under(self.workdir), key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        shutil.rmtree(self.sockets, ignore_errors=True)


# The CRI messages are small enough to write by hand (runtime.v1, the CRI API's api.proto):
# PullImageRequest{ImageSpec image = 1}, ImageSpec{string image = 1}, PullImageResponse{string
# image_ref = 1}. Protocol buffers' wire format: a field is (number << 3 | 2) and a varint length.
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _pull_request(ref: str) -> bytes:
    return _field(1, _field(1, ref.encode()))


def _string_field(data: bytes, number: int) -> str:
    from snapshot.criuimg import _varint as read_varint  # CRIU's images are protobuf too
    i = 0
    while i < len(data):
        key, i = read_varint(data, i)
        if key & 7 != 2:
            raise ValueError(f"unexpected wire type {key & 7} in a CRI answer")
        size, i = read_varint(data, i)
        if key >> 3 == number:
            return data[i:i + size].decode()
        i += size
    return ""


def _mounts_under(root: Path) -> list[str]:
    from lazyfs.fs.mounts import mount_table
    return [m.point for m in mount_table() if m.point.startswith(str(root))]

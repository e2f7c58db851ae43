"""Shared fixtures. Stores under test are listed in STORE_FACTORIES (the conformance suite runs each)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from bench.servers import lazyfs_cli  # noqa: F401 - the tests' way to run the CLI

# Tests mount on their own unless they test the node agent (tests/test_node.py turns it on):
# a resident agent per test would outlive it and share mounts across tests.
os.environ["LAZYFS_NODE"] = "off"
from lazyfs.store.local import LocalStore

ROOT = Path(__file__).resolve().parent.parent
LAZYFS = [sys.executable, "-m", "lazyfs.cli"]

# A shell without job control starts a background command with SIGINT ignored, and that is
# inherited: every `lazyfs run` the Ctrl-C tests start would ignore their Ctrl-C as a command
# run with `&` should. Handled here, the signal is back to its default in what the tests exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _local_store(request, tmp_path: Path):
    return LocalStore(tmp_path / "store")


def _s3_store(request, tmp_path: Path):
    from lazyfs.store.s3 import S3Store
    request.getfixturevalue("s3_server")
    return S3Store(f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}")


def _http_store(request, tmp_path: Path):
    from lazyfs.store.http import HttpStore
    server = request.getfixturevalue("cache_server")
    return HttpStore(server.url, token=server.token)


STORE_FACTORIES = {"local": _local_store, "s3": _s3_store, "http": _http_store}
S3_BUCKET = "lazyfs-test"


@pytest.fixture(params=sorted(STORE_FACTORIES))
def any_store(request, tmp_path):
    store = STORE_FACTORIES[request.param](request, tmp_path)
    yield store
    store.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real SeaweedFS S3 server for the session; AWS_* variables point at it (for the CLI too)."""
    from bench.servers import SeaweedS3
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"SeaweedFS S3 server cannot start: {exc}")
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    server.make_bucket(S3_BUCKET)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


TEST_TOKEN = "test-token-0123456789abcdef"


@pytest.fixture
def cache_server(tmp_path):
    """A real cache server on 127.0.0.1 (on a thread) over a fresh local origin store."""
    from cache_server.app import ServerConfig
    from cache_server.server import ServerThread
    origin = LocalStore(tmp_path / "origin")
    with ServerThread(origin, tmp_path / "server-cache", config=ServerConfig(token=TEST_TOKEN)) as srv:
        srv.token = TEST_TOKEN
        yield srv


@pytest.fixture
def s3_url(s3_server):
    """A fresh, empty S3 store URL (its own prefix in the session's bucket)."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"


def mount_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "FUSE mount tests need root (they mount with allow_other and overlayfs)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not shutil.which("fusermount") and not shutil.which("fusermount3"):
        return "fusermount not installed (apt-get install fuse3)"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError, EnvironmentError) as exc:
        return f"fusepy cannot load libfuse ({exc}); apt-get install libfuse2"
    return None


# Every test that mounts carries the `mount` marker: `-m "not mount"` runs the rest on a machine
# without FUSE, and here a marked test skips with the reason when mounting is impossible.
needs_mount = pytest.mark.mount


# Test modules that start servers, runtimes, registries or network namespaces inside their tests
# (beyond what the markers and fixtures below show): their tests are integration tests.
INTEGRATION_MODULES = {
    "test_autoprofile", "test_bench", "test_block_source", "test_cache_server", "test_containerd", "test_demo",
    "test_fleet", "test_fleet_burst", "test_fleet_mount", "test_hostile_builds", "test_kernel_path",
    "test_lazypages", "test_layers", "test_mount", "test_node", "test_nodecache", "test_profile",
    "test_registry", "test_roundtrip", "test_run", "test_server_hostile", "test_server_load",
    "test_snapshot", "test_snapshot_gpu", "test_store_s3",
}
INTEGRATION_FIXTURES = {"s3_server", "cache_server"}


def pytest_collection_modifyitems(config, items):
    """Every test is `unit` (no root, no servers, no mounts: `pytest -m unit` runs anywhere) or
    `integration` (real mounts, servers, runtimes, namespaces)."""
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        params = getattr(getattr(item, "callspec", None), "params", {})
        integration = (item.get_closest_marker("mount") is not None
                       or item.get_closest_marker("integration") is not None or module in INTEGRATION_MODULES
                       or INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ()))
                       or params.get("any_store") in ("s3", "http"))
        if not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration if integration else pytest.mark.unit)


def pytest_runtest_setup(item):
    if item.get_closest_marker("mount") is not None:
        reason = mount_skip_reason()
        if reason is not None:
            pytest.skip(reason)


def lazyfs_mounts(under: str | Path | None = None) -> list[str]:
    """Mountpoints of lazyfs FUSE mounts, of the kernel path's EROFS images and overlays, and of
    the overlays `lazyfs run` puts on them (only those below ``under``, if given)."""
    from lazyfs.fs.mounts import mount_table
    out = []
    for m in mount_table():
        kernel_path = (m.fstype == "erofs" and "/erofs/" in f"{m.point} {m.source}") or \
            (m.fstype == "overlay" and ".d/meta::" in m.options)
        if (m.fstype == "fuse.lazyfs" or kernel_path or "/lazyfs/run/" in m.point
                or "/lazyfs/snap/" in m.point) and (under is None or m.point.startswith(f"{under}/")):
            out.append(m.point)
    return out


def _podman_leftovers() -> list[str]:
    """Names of lazyfs containers podman still has (created, running or stopped)."""
    if not shutil.which("podman"):
        return []
    proc = subprocess.run(["podman", "--runtime", shutil.which("runc") or "runc", "ps", "-a",
                           "--filter", "name=^lazyfs-", "--format", "{{.Names}}"],
                          capture_output=True, text=True, timeout=60)
    return proc.stdout.split()


# Directories whose mounts a module- or session-scoped fixture holds across its tests (and takes
# down itself): the check after each test leaves them alone.
HELD_MOUNTS: set[Path] = set()


@pytest.fixture(autouse=True)
def _leave_nothing_mounted(request, tmp_path_factory):
    """After every mount test: what it left mounted below this session's temporary directory
    (or a lazyfs container it left running) is taken down here, so one failing test cannot
    make the ones after it fail too. The test that left it fails on its own assertions. Mounts
    under HELD_MOUNTS belong to a fixture that outlives the test, not to the test."""
    yield
    if request.node.get_closest_marker("mount") is None:
        return
    mine = tmp_path_factory.getbasetemp().resolve()
    held = [f"{p.resolve()}/" for p in HELD_MOUNTS]
    left = [mp for mp in lazyfs_mounts(mine) if not any(mp.startswith(h) for h in held)]
    for mp in sorted(left, key=len, reverse=True):  # overlays above their image
        subprocess.run(["umount", "-l", mp], capture_output=True)
    from lazyfs.runner.runtime import conmon_containers
    if any(name.startswith("lazyfs-") for name in conmon_containers()):
        for name in _podman_leftovers():
            subprocess.run(["podman", "--runtime", shutil.which("runc") or "runc", "rm", "-f",
                            "-t", "0", name], capture_output=True, timeout=60)


@pytest.fixture(params=["kernel", "fuse"])
def data_path(request, monkeypatch):
    """Run the test on both data paths (lazyfs.fs.kernel, and the FUSE fallback)."""
    if request.param == "kernel":
        from lazyfs.fs import kernel
        reason = kernel.unavailable()
        if reason:
            pytest.skip(f"kernel data path unavailable: {reason}")
    monkeypatch.setenv("LAZYFS_DATA_PATH", request.param)
    return request.param


@pytest.fixture
def env_dirs(tmp_path):
    """Isolated store, node cache and state dirs for the CLI, as environment variables."""
    env = {"LAZYFS_STORE": str(tmp_path / "store"), "LAZYFS_CACHE_DIR": str(tmp_path / "cache"),
           "LAZYFS_STATE_DIR": str(tmp_path / "state")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def node_agent(env_dirs, monkeypatch):
    """The node agent turned on (it starts on the first run), on a short socket path,
    unmounting 1 s after the last user leaves. Whatever agent the test started is stopped
    afterwards, and what it left mounted goes too."""
    sockdir = Path(tempfile.mkdtemp(prefix="lzn-", dir="/tmp"))
    env = {"LAZYFS_NODE": "auto", "LAZYFS_NODE_SOCKET": str(sockdir / "node.sock"),
           "LAZYFS_NODE_METRICS": "127.0.0.1:0", "LAZYFS_NODE_IDLE": "1s"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield env
    pidfile = Path(env_dirs["LAZYFS_STATE_DIR"]) / "node" / "agent.pid"
    if pidfile.exists():
        stop_process(int(pidfile.read_text()))
    for mp in sorted(lazyfs_mounts(env_dirs["LAZYFS_STATE_DIR"]), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)
    subprocess.run(["rm", "-rf", str(sockdir)])


def stop_process(pid: int, sig=signal.SIGTERM) -> None:
    """Signal ``pid`` and wait until it is gone (or a zombie); SIGKILL after 5 s."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    for _ in range(200):
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.025)
    os.kill(pid, signal.SIGKILL)


class Mounted:
    def __init__(self, ref: str, mountpoint: Path, *extra):
        self.ref, self.mountpoint, self.extra = ref, mountpoint, extra

    def __enter__(self):
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        lazyfs_cli("mount", self.ref, self.mountpoint, *self.extra)
        return self.mountpoint

    def stats(self) -> dict:
        from lazyfs.fs import control
        return control.query(str(self.mountpoint))

    def __exit__(self, *exc):
        lazyfs_cli("umount", self.mountpoint, check=False)
        subprocess.run(["fusermount", "-u", "-z", str(self.mountpoint)], capture_output=True)


@pytest.fixture(scope="session")
def umoci_image(tmp_path_factory):
    from tests import images
    if not images.UMOCI:
        pytest.skip("umoci not installed (apt-get install umoci): it is the round-trip oracle")
    work = tmp_path_factory.mktemp("umoci")
    layout = images.build_umoci_image(work)
    oracle = images.unpack_oracle(layout, "test", work / "oracle")
    return layout, oracle


BUSYBOX = shutil.which("busybox")


def busybox_rootfs(root: Path) -> Path:
    """A small but real, runnable root filesystem: a static busybox and its applet links."""
    if not BUSYBOX:
        pytest.skip("busybox not installed (apt-get install busybox-static)")
    for d in ("bin", "etc", "tmp", "proc", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "echo", "sleep", "wc", "sha256sum", "hostname", "id", "env"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (root / "etc" / "os-release").write_text("NAME=lazyfs-busybox\n")
    return root

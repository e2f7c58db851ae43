"""`lazyfs run`: exit codes pass through, writes land in the overlay, cleanup always happens."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from imagebuilder.ociwriter import TarEntry, make_tar, write_layout
from lazyfs.runner import runtime as rt
from tests.conftest import LAZYFS, ROOT, busybox_rootfs, lazyfs_cli, needs_mount

pytestmark = needs_mount
RUNTIMES = [pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))
            for name, reason in rt.available().items()]


@pytest.fixture
def bb_image(env_dirs, tmp_path):
    root = busybox_rootfs(tmp_path / "rootfs")
    lazyfs_cli("build", f"dir:{root}", "--tag", "run/bb:1")
    return root


def _lazyfs_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if "fuse.lazyfs" in line or "/lazyfs/run/" in line]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_exit_code_and_output(bb_image, runtime):
    proc = lazyfs_cli("run", "--runtime", runtime, "-v", "run/bb:1", "--",
                      "sh", "-c", "cat /etc/os-release; exit 7", check=False)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "NAME=lazyfs-busybox\n"
    assert ("podman" if runtime == "podman" else "namespaces") in proc.stderr  # --verbose says which
    assert _lazyfs_mounts() == []


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_writes_land_in_the_overlay_not_the_cache(bb_image, runtime, tmp_path, env_dirs):
    upper = tmp_path / "upper"
    store_before = sorted(p.name for p in Path(env_dirs["LAZYFS_STORE"]).rglob("*"))
    proc = lazyfs_cli("run", "--runtime", runtime, "--upper", upper, "run/bb:1", "--", "sh", "-c",
                      "echo changed > /etc/os-release; echo new > /tmp/new-file; rm /bin/wc; "
                      "cat /etc/os-release")
    assert proc.stdout == "changed\n"
    assert (upper / "etc" / "os-release").read_text() == "changed\n"
    assert (upper / "tmp" / "new-file").read_text() == "new\n"
    assert os.path.exists(upper / "bin" / "wc")  # a whiteout (char device 0:0) in the upper layer
    # The image, its blocks and the node cache are untouched.
    assert (bb_image / "etc" / "os-release").read_text() == "NAME=lazyfs-busybox\n"
    assert sorted(p.name for p in Path(env_dirs["LAZYFS_STORE"]).rglob("*")) == store_before
    for block in Path(env_dirs["LAZYFS_CACHE_DIR"], "blocks").rglob("*"):
        if block.is_file():
            assert hashlib.sha256(block.read_bytes()).hexdigest() == block.name
    # A fresh run sees the original image again.
    assert lazyfs_cli("run", "--runtime", runtime, "run/bb:1", "--", "cat", "/etc/os-release").stdout \
        == "NAME=lazyfs-busybox\n"


def test_image_config_supplies_command_env_and_workdir(env_dirs, tmp_path):
    root = busybox_rootfs(tmp_path / "rootfs")
    base = make_tar([TarEntry("bin/busybox", (root / "bin" / "busybox").read_bytes(), mode=0o755),
                     TarEntry("bin/sh", type=b"2", linkname="busybox", mode=0o777),
                     TarEntry("work/", type=b"5", mode=0o755)])
    layout = write_layout(tmp_path / "oci", [base], "v1", config={
        "Env": ["PATH=/bin", "GREETING=from-config"], "Cmd": ["sh", "-c", 'echo "$GREETING in $PWD"'],
        "WorkingDir": "/work"})
    lazyfs_cli("build", f"oci:{layout}:v1", "--tag", "run/cfg:1")
    assert lazyfs_cli("run", "run/cfg:1").stdout == "from-config in /work\n"
    out = lazyfs_cli("run", "-e", "GREETING=overridden", "run/cfg:1", "--", "sh", "-c", 'echo $GREETING')
    assert out.stdout == "overridden\n"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_ctrl_c_cleans_up_every_mount(bb_image, runtime, env_dirs):
    proc = subprocess.Popen([*LAZYFS, "run", "--runtime", runtime, "run/bb:1", "--", "sleep", "60"],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not _lazyfs_mounts() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # let the container start
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the foreground group
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert _lazyfs_mounts() == []
    assert list(Path(env_dirs["LAZYFS_STATE_DIR"], "run").iterdir()) == []


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_sigterm_stops_a_container_whose_init_ignores_it(bb_image, runtime, env_dirs):
    """`kill PID` of lazyfs run (what a supervisor or the bench does): the command runs as PID 1,
    which ignores SIGTERM without a handler, so the stop must escalate to SIGKILL after a grace."""
    proc = subprocess.Popen([*LAZYFS, "run", "--runtime", runtime, "run/bb:1", "--", "sleep", "60"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not _lazyfs_mounts() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert time.monotonic() - t0 < 15  # grace (2 s) plus teardown, not the 60 s sleep
    assert proc.returncode != 0
    assert _lazyfs_mounts() == []


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_user_workdir_and_hostname(bb_image, runtime):
    out = lazyfs_cli("run", "--runtime", runtime, "--user", "nobody", "--workdir", "/tmp", "run/bb:1",
                     "--", "sh", "-c", "id -u; id -g; pwd; hostname").stdout.split()
    assert out == ["65534", "65534", "/tmp", "lazyfs"]
    out = lazyfs_cli("run", "--runtime", runtime, "--user", "1234:4321", "run/bb:1", "--",
                     "sh", "-c", "id -u; id -g").stdout.split()
    assert out == ["1234", "4321"]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_missing_command_in_image(bb_image, runtime):
    proc = lazyfs_cli("run", "--runtime", runtime, "run/bb:1", "--", "/no/such/binary", check=False)
    assert proc.returncode in (126, 127), (proc.returncode, proc.stderr)
    assert "/no/such/binary" in proc.stderr
    assert _lazyfs_mounts() == []

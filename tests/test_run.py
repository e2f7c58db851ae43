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
from tests.conftest import (LAZYFS, ROOT, _podman_leftovers, busybox_rootfs, lazyfs_cli,
                            lazyfs_mounts, needs_mount)

pytestmark = needs_mount


def _mounts() -> list[str]:
    """This test's run mounts (image and overlay live under its LAZYFS_STATE_DIR)."""
    return lazyfs_mounts(os.environ["LAZYFS_STATE_DIR"])


RUNTIMES = [pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))
            for name, reason in rt.available().items()]


@pytest.fixture
def bb_image(env_dirs, tmp_path):
    root = busybox_rootfs(tmp_path / "rootfs")
    lazyfs_cli("build", f"dir:{root}", "--tag", "run/bb:1")
    return root




@pytest.mark.parametrize("runtime", RUNTIMES)
def test_exit_code_and_output(bb_image, runtime):
    proc = lazyfs_cli("run", "--runtime", runtime, "-v", "run/bb:1", "--",
                      "sh", "-c", "cat /etc/os-release; exit 7", check=False)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "NAME=lazyfs-busybox\n"
    assert ("podman" if runtime == "podman" else "namespaces") in proc.stderr  # --verbose says which
    assert _mounts() == []


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


def _configured_image(tmp_path: Path, tag: str, config: dict) -> None:
    """A busybox image with /work, built from an OCI layout whose config is ``config``."""
    root = busybox_rootfs(tmp_path / "rootfs")
    base = make_tar([TarEntry("bin/busybox", (root / "bin" / "busybox").read_bytes(), mode=0o755),
                     TarEntry("bin/sh", type=b"2", linkname="busybox", mode=0o777),
                     TarEntry("work/", type=b"5", mode=0o755)])
    layout = write_layout(tmp_path / "oci", [base], "v1", config=config)
    lazyfs_cli("build", f"oci:{layout}:v1", "--tag", tag)


def test_image_config_supplies_command_env_and_workdir(env_dirs, tmp_path):
    _configured_image(tmp_path, "run/cfg:1", {
        "Env": ["PATH=/bin", "GREETING=from-config"], "Cmd": ["sh", "-c", 'echo "$GREETING in $PWD"'],
        "WorkingDir": "/work"})
    assert lazyfs_cli("run", "run/cfg:1").stdout == "from-config in /work\n"
    out = lazyfs_cli("run", "-e", "GREETING=overridden", "run/cfg:1", "--", "sh", "-c", 'echo $GREETING')
    assert out.stdout == "overridden\n"


@pytest.mark.parametrize("delay", [0.0, 0.1, 1.0], ids=["at-mount", "while-starting", "running"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_ctrl_c_cleans_up_every_mount(bb_image, runtime, env_dirs, delay, data_path):
    """Ctrl-C ends a run within seconds wherever it lands: while the image mounts, while the
    runtime starts the container (podman's client dies then and used to leave the container,
    and with it the mount, behind), or once the container runs."""
    proc = subprocess.Popen([*LAZYFS, "run", "--runtime", runtime, "run/bb:1", "--", "sleep", "60"],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not _mounts() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the foreground group
        t0 = time.monotonic()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate()
    # grace (2 s) + SIGTERM grace (2 s) + teardown; what the run said, should it hang
    assert waited < 10, stderr.decode(errors="replace")[-3000:]
    assert proc.returncode != 0
    assert _mounts() == []
    assert list(Path(env_dirs["LAZYFS_STATE_DIR"], "run").iterdir()) == []
    if runtime == "podman":
        assert _podman_leftovers() == []


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_what_a_run_killed_with_sigkill_leaves_the_next_run_removes(bb_image, runtime, env_dirs):
    """SIGKILL gives `lazyfs run` no chance to tear down: its image mount and overlay stay (and
    with podman, the container under conmon). The next run on the node removes them; with the
    namespaces runtime the container has died with the run already."""
    proc = subprocess.Popen([*LAZYFS, "run", "--runtime", runtime, "run/bb:1", "--", "sh", "-c",
                             "echo started; sleep 60"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"started\n"
        left = _mounts()
        assert len(left) >= 2  # the image's mount and the overlay on it
        proc.kill()
        if runtime == "namespaces":
            proc.communicate(timeout=10)  # the container (which holds the output's pipe) died too
        assert _mounts() == left
        r = lazyfs_cli("run", "--runtime", runtime, "run/bb:1", "--", "sh", "-c", "exit 0")
        assert "removed what a run killed without tearing down left" in r.stderr, r.stderr
        assert _mounts() == []
        assert list(Path(env_dirs["LAZYFS_STATE_DIR"], "run").iterdir()) == []
        if runtime == "podman":
            assert _podman_leftovers() == []
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_a_container_running_as_another_user_dies_with_a_run_killed_with_sigkill(bb_image, env_dirs):
    """Switching to the container's user clears the parent-death signal that takes a container
    along with a SIGKILLed `lazyfs run`; it must be set again after the switch."""
    argv = [b"sleep", b"67"]  # (a number of its own, to find it should it survive)
    proc = subprocess.Popen([*LAZYFS, "run", "--runtime", "namespaces", "--user", "nobody", "run/bb:1", "--",
                             "sh", "-c", "echo started; exec sleep 67"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"started\n"
        proc.kill()
        proc.communicate(timeout=10)  # the container (which holds the output's pipe) died too
        lazyfs_cli("run", "run/bb:1", "--", "sh", "-c", "exit 0")  # (removes what the kill left)
    finally:
        proc.kill()
        for pid in (p.name for p in Path("/proc").iterdir() if p.name.isdigit()):
            try:
                if Path("/proc", pid, "cmdline").read_bytes().split(b"\0")[:2] == argv:
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        proc.communicate(timeout=30)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_sigterm_stops_a_container_whose_init_ignores_it(bb_image, runtime, env_dirs):
    """`kill PID` of lazyfs run (what a supervisor or the bench does): the command runs as PID 1,
    which ignores SIGTERM without a handler, so the stop must escalate to SIGKILL after a grace."""
    proc = subprocess.Popen([*LAZYFS, "run", "--runtime", runtime, "run/bb:1", "--", "sleep", "60"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not _mounts() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert time.monotonic() - t0 < 15  # grace (2 s) plus teardown, not the 60 s sleep
    assert proc.returncode != 0
    assert _mounts() == []


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
    assert _mounts() == []


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_snapshot_helper_is_in_every_run(env_dirs, tmp_path, runtime):
    """`import lazyfs_snapshot` works in a plain run: the helper sits in a layer of its own,
    first on PYTHONPATH, the image's own PYTHONPATH kept after it, nothing written to --upper."""
    from lazyfs.runner.helper import SOURCE
    root = busybox_rootfs(tmp_path / "rootfs")
    layout = write_layout(tmp_path / "oci", [make_tar([
        TarEntry("bin/busybox", (root / "bin" / "busybox").read_bytes(), mode=0o755),
        TarEntry("bin/sh", type=b"2", linkname="busybox", mode=0o777),
        TarEntry("bin/cat", type=b"2", linkname="busybox", mode=0o777)])], "v1",
        config={"Env": ["PATH=/bin", "PYTHONPATH=/opt/app"]})
    lazyfs_cli("build", f"oci:{layout}:v1", "--tag", "run/helper:1")
    upper = tmp_path / "upper"
    out = lazyfs_cli("run", "--runtime", runtime, "--upper", upper, "run/helper:1", "--", "sh", "-c",
                     "echo $PYTHONPATH; cat /.lazyfs/python/lazyfs_snapshot.py").stdout
    path, _, module = out.partition("\n")
    assert path == "/.lazyfs/python:/opt/app"
    assert module == SOURCE.read_text()
    assert not (upper / ".lazyfs").exists()


def test_options_between_the_image_and_the_command(env_dirs, tmp_path):
    """`lazyfs run NAME:TAG --store DIR -- CMD` and docker's `lazyfs run --store DIR NAME:TAG CMD`
    both read from DIR (the image is not in the default store, so a dropped --store fails)."""
    root = busybox_rootfs(tmp_path / "rootfs")
    other = tmp_path / "other-store"
    lazyfs_cli("build", f"dir:{root}", "--tag", "run/elsewhere:1", "--store", other)
    after = lazyfs_cli("run", "run/elsewhere:1", "--store", other, "-e", "X=after", "--", "sh", "-c",
                       "echo $X; cat /etc/os-release")
    assert after.stdout == "after\nNAME=lazyfs-busybox\n"
    before = lazyfs_cli("run", "--store", other, "-e", "X=before", "run/elsewhere:1", "sh", "-c",
                        "echo $X")
    assert before.stdout == "before\n"
    # Without --, what follows the image is the command, its own -- included.
    assert lazyfs_cli("run", "--store", other, "run/elsewhere:1", "echo", "--", "-x").stdout == "-- -x\n"
    bad = lazyfs_cli("run", "run/elsewhere:1", "--stroe", other, "--", "true", check=False)
    assert bad.returncode == 2 and "No such option" in bad.stderr and "--stroe" in bad.stderr
    stray = lazyfs_cli("run", "run/elsewhere:1", "-v", "sh", "--", "true", check=False)
    assert stray.returncode == 2 and "unexpected argument 'sh'" in stray.stderr
    # lazyfs profile takes the same order.
    prof = lazyfs_cli("profile", "run/elsewhere:1", "--store", other, "--no-publish", "--",
                      "cat", "/etc/os-release")
    assert "not published" in prof.stderr and "blocks" in prof.stderr
    assert _mounts() == []


def test_a_container_that_ends_on_sigterm_passes_its_own_status_on(bb_image, env_dirs):
    """`kill` of lazyfs run whose container handles SIGTERM: the run ends with the container's
    status, and nothing on stderr, however its two waits (the run's for the runtime, the stop's
    with a grace) fall; both once collected the same child."""
    for _ in range(4):
        proc = subprocess.Popen([*LAZYFS, "run", "--runtime", "namespaces", "run/bb:1", "--", "sh", "-c",
                                 "trap 'exit 3' TERM; echo started; while :; do sleep 0.05; done"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "started\n"
        time.sleep(0.1)  # (the run's own handler is set by now, on however loaded a machine)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert (proc.returncode, err) == (3, ""), err
    assert _mounts() == []


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_container_starts_with_no_signal_ignored(bb_image, runtime):
    """Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays so across exec: a container
    must not inherit that (`yes | head -1` would report EPIPE errors)."""
    status = lazyfs_cli("run", "--runtime", runtime, "run/bb:1", "--", "cat", "/proc/self/status").stdout
    (ignored,) = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigIgn:")]
    assert ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)) == 0, hex(ignored)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_working_directory_the_image_lacks_is_made_and_a_relative_one_refused(bb_image, runtime, tmp_path):
    made = lazyfs_cli("run", "--runtime", runtime, "-w", "/no/such/dir", "run/bb:1", "--", "sh", "-c", "pwd",
                      check=False)
    if runtime == "podman":  # (podman run --rootfs refuses one, in a line of its own)
        assert made.returncode != 0 and '"/no/such/dir" does not exist' in made.stderr, made.stderr
    else:
        assert made.stdout == "/no/such/dir\n", made.stderr
    relative = lazyfs_cli("run", "--runtime", runtime, "-w", ".", "run/bb:1", "--", "sh", "-c", "pwd", check=False)
    assert relative.returncode == 2 and "absolute path" in relative.stderr, relative.stderr
    assert relative.stdout == ""
    assert _mounts() == []


def test_a_relative_working_dir_in_an_image_is_taken_from_its_root(env_dirs, tmp_path):
    """(chroot keeps the working directory outside the root: a relative one was the host's.)"""
    _configured_image(tmp_path, "run/relwd:1", {
        "Env": ["PATH=/bin"], "Cmd": ["sh", "-c", 'echo "$PWD"; ls -a'], "WorkingDir": "work"})
    (tmp_path / "host-only").write_text("")
    proc = subprocess.run([*LAZYFS, "run", "--runtime", "namespaces", "run/relwd:1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (0, "/work\n.\n..\n"), proc.stderr


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_env_and_user_mistakes_get_one_line(bb_image, runtime, tmp_path):
    passed = lazyfs_cli("run", "--runtime", runtime, "-e", "FROM_SHELL", "-e", "UNSET_HERE", "run/bb:1",
                        "--", "sh", "-c", 'echo "$FROM_SHELL ${UNSET_HERE-unset}"',
                        env={"FROM_SHELL": "shell value"})
    assert "UNSET_HERE" not in os.environ
    assert passed.stdout == "shell value unset\n"
    for bad in (["-e", "=x"], ["--user", ":grp"], ["--user", "a:b:c"]):
        proc = lazyfs_cli("run", "--runtime", runtime, *bad, "run/bb:1", "--", "true", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (bad, proc.stderr)
    # No such user in the image's /etc/passwd, nor group in its /etc/group; nor may an id exceed
    # the kernel's, or be spelt in other digits than ASCII's.
    for user, words in (("nosuchuser", "not found"), ("nobody:staff", "/etc/group"),
                        ("4294967295", "out of range"), ("\u00b2", "not found")):
        proc = lazyfs_cli("run", "--runtime", "namespaces", "--user", user, "run/bb:1", "--", "true",
                          check=False)
        assert proc.returncode != 0 and words in proc.stderr, (user, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert _mounts() == []

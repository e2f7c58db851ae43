"""The node agent (`lazyfs node`): shared mounts, idle unmount, surviving its own SIGKILL, the cache
cap, start on demand, stale sockets, root only. Real mounts, real runs, real agent processes."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from snapshot.procs import children
from lazyfs.runner import runtime as rt
from tests.conftest import _podman_leftovers, busybox_rootfs, lazyfs_cli, lazyfs_mounts, stop_process as _stop

pytestmark = pytest.mark.mount
RUN = ("run", "--runtime", "namespaces")
RUNTIMES = [pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))
            for name, reason in rt.available().items()]


@pytest.fixture
def node(node_agent):
    return node_agent


def _status() -> dict:
    return json.loads(lazyfs_cli("node", "status", "--json").stdout)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""  # gone


def _image(tmp_path: Path, files: dict[str, bytes], tag: str = "node/app:1") -> str:
    root = busybox_rootfs(tmp_path / "rootfs")
    for applet in ("dd", "md5sum", "true"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "data").mkdir()
    for name, data in files.items():
        (root / "data" / name).write_bytes(data)
    lazyfs_cli("build", f"dir:{root}", "--tag", tag)
    return tag


def _random(n: int, seed: int) -> bytes:
    return hashlib.shake_256(str(seed).encode()).digest(n)


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _unused() -> bool:
    """No image has a user (or none is mounted any more)."""
    return [len(i["users"]) for i in _status()["images"]] in ([0], [])


def _cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lazyfs.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_runs_share_one_mount_until_the_grace_period_ends(node, tmp_path):
    data = _random(3 << 20, 1)
    tag = _image(tmp_path, {"a": data})
    first = _cli(*RUN, "-v", tag, "--", "sh", "-c", "sha256sum /data/a; echo started; sleep 3")
    try:
        assert first.stdout.readline().split()[0] == hashlib.sha256(data).hexdigest()
        assert first.stdout.readline().strip() == "started"
        before = _status()["images"]
        assert len(before) == 1 and len(before[0]["users"]) == 1
        # The agent's processes by name (ps -o comm, top): each is a fork of one interpreter.
        assert _comm(_status()["agent"]["pid"]) == "lazyfs-node"
        assert _comm(before[0]["daemon_pid"]) == "lazyfs-mount"
        forker = [p for p in children(_status()["agent"]["pid"]) if _comm(p) == "lazyfs-forker"]
        assert len(forker) == 1  # the fork server: the daemons and the runs it takes are its children
        assert [_comm(p) for p in children(forker[0])] == ["lazyfs-mount"]
        third = _cli(*RUN, tag, "--", "sleep", "2")  # (the agent is up now: the fast path takes it)
        try:
            _wait(lambda: "lazyfs-run" in [_comm(p) for p in children(forker[0])], 10, "a run named so")
        finally:
            assert third.wait(30) == 0
        fetched = before[0]["counters"]["cache"]["misses"]
        second = lazyfs_cli(*RUN, "-v", tag, "--", "sha256sum", "/data/a")
        assert second.stdout.split()[0] == hashlib.sha256(data).hexdigest()
        assert "sharing" in second.stderr and "mounted " not in second.stderr.split("sharing")[0]
        after = _status()["images"]
        assert len(after) == 1 and after[0]["mountpoint"] == before[0]["mountpoint"]
        assert after[0]["daemon_pid"] == before[0]["daemon_pid"]
        assert after[0]["counters"]["cache"]["misses"] == fetched  # the second start fetched nothing
    finally:
        first.communicate(timeout=30)
    assert first.returncode == 0
    released = time.monotonic()
    assert [len(i["users"]) for i in _status()["images"]] == [0]  # still up: the grace period
    _wait(lambda: not _status()["images"], 10, "the idle unmount")
    assert time.monotonic() - released >= 0.9
    assert not lazyfs_mounts(os.environ["LAZYFS_STATE_DIR"])


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_run_killed_without_a_goodbye_is_swept_by_the_agent(node, tmp_path, runtime):
    """SIGKILL leaves a run (the first here: the full CLI, which starts the agent) no chance to
    release its lease or tear down. The agent sees the holder's process exit: it drops the lease
    and sweeps what the run left (with podman, the container under conmon first; then the
    overlay and the run's directory), and only then may the unused mount go: never from under a
    container that still reads it."""
    tag = _image(tmp_path, {"a": _random(1 << 20, 2)}, tag="node/killed:1")
    run = _cli("run", "--runtime", runtime, tag, "--", "sh", "-c", "echo started; sleep 60")
    state = Path(os.environ["LAZYFS_STATE_DIR"])
    try:
        assert run.stdout.readline().strip() == "started"
        users = _status()["images"][0]["users"]
        assert [u["kind"] for u in users] == ["run"] and users[0]["pid"] > 0
        os.kill(users[0]["pid"], signal.SIGKILL)
        _wait(_unused, 10, "the killed run's lease to be dropped")
        _wait(lambda: not lazyfs_mounts(str(state / "run")) and not list((state / "run").iterdir()),
              30, "the agent to sweep the killed run's overlay and directory")
        run.communicate(timeout=10)  # the container (which holds the output's pipe) is gone
        if runtime == "podman":
            assert _podman_leftovers() == []
        assert "removed what a run killed without tearing down left" in _agent_log_text()
        _wait(lambda: not _status()["images"], 15, "the idle unmount")
    finally:
        run.kill()
        run.communicate(timeout=30)
    assert not lazyfs_mounts(os.environ["LAZYFS_STATE_DIR"])


def test_an_idle_mount_stays_while_a_killed_runs_overlay_is_on_it(node, tmp_path):
    """overlayfs keeps private clones of its layers, so unmounting the image under a run's
    overlay is never "busy": the agent looks for overlays on the mount itself, and keeps it
    while one is there (here: one the agent cannot sweep, as its run's owner record is gone)."""
    from lazyfs.fs.mounts import stacked_on
    tag = _image(tmp_path, {"a": _random(1 << 20, 4)}, tag="node/stacked:1")
    run = _cli(*RUN, tag, "--", "sh", "-c", "echo started; sleep 60")
    state = Path(os.environ["LAZYFS_STATE_DIR"])
    try:
        assert run.stdout.readline().strip() == "started"
        [image] = _status()["images"]
        [rundir] = list((state / "run").iterdir())
        (rundir / "owner.json").unlink()  # (not a run's directory the sweep may judge)
        [overlay] = stacked_on(image["mountpoint"])
        assert Path(overlay) == rundir / "rootfs"
        os.kill(image["users"][0]["pid"], signal.SIGKILL)
        run.communicate(timeout=10)
        _wait(_unused, 10, "the killed run's lease to be dropped")
        time.sleep(3)  # past the idle time (1 s here) and a try or two
        assert [i["mountpoint"] for i in _status()["images"]] == [image["mountpoint"]]
        assert "idle but still used: an overlay on it" in _agent_log_text()
        subprocess.run(["umount", overlay], check=True)
        _wait(lambda: not _status()["images"], 15, "the idle unmount once the overlay is gone")
    finally:
        run.kill()
        run.communicate(timeout=30)
    assert not lazyfs_mounts(os.environ["LAZYFS_STATE_DIR"])


def _agent_log_text() -> str:
    return (Path(os.environ["LAZYFS_STATE_DIR"]) / "node" / "agent.log").read_text(errors="replace")


def test_a_client_killed_with_sigkill_stops_the_run_the_agent_forked(node, tmp_path):
    """The agent's fork runs the container; the `lazyfs run` the caller sees is its client. A
    client killed with SIGKILL forwards nothing, so the fork notices the client gone and stops as
    a `kill` of the run would: the container stopped, its directory and overlay torn down, the
    lease handed back."""
    tag = _image(tmp_path, {"a": _random(1 << 20, 3)}, tag="node/client-killed:1")
    lazyfs_cli(*RUN, tag, "--", "sh", "-c", "exit 0")  # (starts the agent: the next run is a fork)
    run = _cli(*RUN, tag, "--", "sh", "-c", "echo started; sleep 60")
    try:
        assert run.stdout.readline().strip() == "started"
        [worker] = [u["pid"] for u in _status()["images"][0]["users"]]
        assert worker != run.pid and _comm(worker) == "lazyfs-run"
        run.kill()
        run.communicate(timeout=15)  # the container (which holds the output's pipe) stopped
        _wait(lambda: _comm(worker) == "", 10, "the agent's fork to end")
        _wait(_unused, 10, "the lease handed back")
        state = Path(os.environ["LAZYFS_STATE_DIR"])
        assert not lazyfs_mounts(str(state / "run")) and not list((state / "run").iterdir())
        _wait(lambda: not _status()["images"], 10, "the idle unmount")
    finally:
        run.kill()
        run.communicate(timeout=30)
    assert not lazyfs_mounts(os.environ["LAZYFS_STATE_DIR"])


def test_agent_killed_while_readers_read_is_taken_over(node, tmp_path, env_dirs):
    files = {f"f{i}": _random(4 << 20, 10 + i) for i in range(4)}
    tag = _image(tmp_path, files)
    agent = _cli("node")
    assert "ready" in agent.stdout.readline()
    # Each reader reads its file a MiB at a time with pauses, so most of it is read (and fetched
    # through the image's mount daemon) after the agent is gone.
    slow = "for i in 0 1 2 3; do dd if=/data/{n} bs=1M skip=$i count=1 2>/dev/null; sleep 0.5; done | sha256sum"
    readers = [_cli(*RUN, tag, "--", "sh", "-c", slow.format(n=n)) for n in files]
    try:
        (image,) = _wait(lambda: [i for i in _status()["images"] if len(i["users"]) == 4], 30, "4 users")
        agent.kill()
        agent.wait()
        from lazyfs.fs import control
        at_kill = control.query(image["mountpoint"])["cache"]["misses"]
        time.sleep(0.3)
        second = _cli("node")
        assert "1 mount(s) adopted" in second.stdout.readline()
        adopted = _status()["images"]
        assert len(adopted) == 1 and 1 <= len(adopted[0]["users"]) <= 4
        for n, proc in zip(files, readers):
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            assert out.split()[0] == hashlib.sha256(files[n]).hexdigest(), n
        # The image's daemon kept fetching for them while no agent ran.
        assert control.query(image["mountpoint"])["cache"]["misses"] > at_kill
        _wait(lambda: not _status()["images"], 10, "the idle unmount after the readers")
        assert not lazyfs_mounts(env_dirs["LAZYFS_STATE_DIR"])
    finally:
        for proc in readers:
            if proc.poll() is None:
                proc.kill()
        _stop(agent.pid, signal.SIGKILL)
    second.terminate()
    assert second.wait(timeout=15) == 0


def test_cache_cap_holds_under_twice_its_size(node, tmp_path, env_dirs, monkeypatch):
    from lazyfs.cache import cap

    limit = 4 << 20
    monkeypatch.setenv("LAZYFS_NODE_CACHE_SIZE", str(limit))
    files = {f"f{i}": _random(1 << 20, 100 + i) for i in range(8)}
    tag = _image(tmp_path, files)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], cap.usage_scan(env_dirs["LAZYFS_CACHE_DIR"])[1])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for _ in range(2):  # twice through: what the first pass evicted is fetched again
            out = lazyfs_cli(*RUN, tag, "--", "sh", "-c", "md5sum /data/*").stdout
            sums = dict(line.split()[::-1] for line in out.splitlines())
            assert sums == {f"/data/{n}": hashlib.md5(d).hexdigest() for n, d in files.items()}
    finally:
        stop.set()
        sampler.join()
    # Room is made before each block is written, so the cap holds at every moment.
    assert peak[0] <= limit, f"cache reached {peak[0]} bytes under a {limit}-byte cap"
    assert cap.usage_scan(env_dirs["LAZYFS_CACHE_DIR"])[1] <= limit
    # The ledger is exact once no one writes: the mount's daemon may still be writing blocks
    # behind when the run exits, so compare after the agent unmounted it (the daemon exited).
    _wait(lambda: not _status()["images"], 30, "the idle mount to go")
    assert cap.usage(env_dirs["LAZYFS_CACHE_DIR"]) == cap.usage_scan(env_dirs["LAZYFS_CACHE_DIR"])


def test_start_on_demand_replaces_a_stale_socket(node, tmp_path):
    tag = _image(tmp_path, {"x": b"x\n"})
    path = node["LAZYFS_NODE_SOCKET"]
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # what a SIGKILLed agent leaves: a socket file nobody listens on
    dead.close()
    assert os.path.exists(path)
    r = lazyfs_cli(*RUN, tag, "--", "cat", "/data/x")
    assert r.stdout == "x\n"
    assert _status()["agent"]["pid"] > 0
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_non_root_gets_a_clear_error(node, tmp_path):
    # All of lazyfs is imported first, then the process becomes nobody and runs `lazyfs run`: the
    # checkout need not be readable by nobody (a fresh clone in a 0700 temporary directory is not).
    as_nobody = ("import importlib, os, pkgutil, sys, lazyfs\n"
                 "for m in pkgutil.walk_packages(lazyfs.__path__, 'lazyfs.'):\n"
                 "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
                 "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
                 "sys.argv = ['lazyfs', *sys.argv[1:]]; from lazyfs.entry import main; main()")
    proc = subprocess.run([sys.executable, "-c", as_nobody, *RUN, "some/image:1", "--", "true"],
                          capture_output=True, text=True, timeout=30, env={**os.environ, "HOME": "/"})
    assert proc.returncode == 1, proc.stderr
    assert "root only" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_mount_and_umount_through_the_agent(node, tmp_path):
    tag = _image(tmp_path, {"m": b"mounted\n"})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lazyfs_cli("mount", tag, mnt)
    try:
        assert (mnt / "data" / "m").read_bytes() == b"mounted\n"
        (users,) = [i["users"] for i in _status()["images"]]
        assert [u["kind"] for u in users] == ["mount"] and users[0]["target"] == str(mnt)
        assert json.loads(lazyfs_cli("stats", mnt).stdout)["cache"]["misses"] >= 1
    finally:
        lazyfs_cli("umount", mnt)
    assert not os.path.ismount(mnt)
    _wait(lambda: not _status()["images"], 10, "the idle unmount")


def test_takeover_replaces_a_running_agent_without_unmounting(node, tmp_path):
    tag = _image(tmp_path, {"t": b"still here\n"})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    first = _cli("node")
    assert "ready" in first.stdout.readline()
    lazyfs_cli("mount", tag, mnt)
    refused = lazyfs_cli("node", check=False, timeout=30)
    assert refused.returncode == 1 and "--takeover" in refused.stderr
    second = _cli("node", "--takeover")
    try:
        assert "1 mount(s) adopted" in second.stdout.readline()
        assert first.wait(timeout=15) == 0
        assert (mnt / "data" / "t").read_bytes() == b"still here\n"
        assert [len(i["users"]) for i in _status()["images"]] == [1]
        lazyfs_cli("umount", mnt)
        _wait(lambda: not _status()["images"], 10, "the idle unmount")
    finally:
        second.terminate()
        second.wait(timeout=15)


def test_the_nodes_own_agent_takes_over_one_a_client_started(node, tmp_path):
    """A run that finds no agent (the node's own restarting, its socket gone for a moment)
    starts one on demand. The node's agent, started on purpose (systemd), then takes that one
    over, mounts and all, instead of failing to start; a second one started on purpose is
    refused as ever."""
    tag = _image(tmp_path, {"t": b"kept\n"})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lazyfs_cli("mount", tag, mnt)  # starts the agent on demand
    on_demand = _status()["agent"]["pid"]
    assert b"--on-demand" in Path(f"/proc/{on_demand}/cmdline").read_bytes()
    own = _cli("node")
    try:
        assert "1 mount(s) adopted" in own.stdout.readline()
        _wait(lambda: _comm(on_demand) == "", 15, "the on-demand agent to hand over and exit")
        assert _status()["agent"]["pid"] == own.pid
        assert (mnt / "data" / "t").read_bytes() == b"kept\n"
        refused = lazyfs_cli("node", check=False, timeout=30)
        assert refused.returncode == 1 and "--takeover" in refused.stderr
        lazyfs_cli("umount", mnt)
    finally:
        own.terminate()
        own.wait(timeout=15)


def test_a_run_forked_by_the_agent_keeps_stdio_exit_code_and_ctrl_c(node, tmp_path):
    tag = _image(tmp_path, {"x": b"x\n"})
    lazyfs_cli(*RUN, tag, "--", "true")  # starts the agent: the runs below are forks of it
    piped = subprocess.run([sys.executable, "-m", "lazyfs.cli", *RUN, tag, "--", "sh", "-c",
                            "cat; echo to-stderr >&2; exit 7"], input="from stdin\n", capture_output=True,
                           text=True, timeout=60)
    assert (piped.returncode, piped.stdout, piped.stderr) == (7, "from stdin\n", "to-stderr\n")
    stats = tmp_path / "stats.json"  # a relative path: the run works in the client's directory
    subprocess.run([sys.executable, "-m", "lazyfs.cli", *RUN, "--stats-json", "stats.json", tag, "--",
                    "true"], cwd=tmp_path, check=True, timeout=60, stdin=subprocess.DEVNULL)
    assert "cache" in json.loads(stats.read_text())
    proc = subprocess.Popen([sys.executable, "-m", "lazyfs.cli", *RUN, tag, "--", "sh", "-c",
                             "trap 'echo got INT; exit 9' INT; echo ready; sleep 30 & wait"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C reaches the client
    out, _ = proc.communicate(timeout=20)
    assert (proc.returncode, out) == (9, "got INT\n")


def _metrics() -> str:
    import urllib.request
    addr = _status()["agent"]["metrics"]
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        return r.read().decode()


def _sample(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def _agent_log(env_dirs) -> str:
    return (Path(env_dirs["LAZYFS_STATE_DIR"]) / "node" / "agent.log").read_text(errors="replace")


def test_a_scrape_that_dribbles_holds_up_neither_runs_nor_scrapes(node, tmp_path):
    """The metrics port is open to every local user. A client that sends its request a byte at a
    time is dropped after its deadline, and the runs and status calls meanwhile are answered as
    ever (the agent's loop never reads a scrape)."""
    tag = _image(tmp_path, {"x": b"x\n"})
    lazyfs_cli(*RUN, tag, "--", "true")  # the agent is up, the image mounted
    host, port = _status()["agent"]["metrics"].rsplit(":", 1)
    stop, dropped = threading.Event(), threading.Event()

    def dribble():
        with socket.create_connection((host, int(port))) as s:
            while not stop.wait(0.2):
                try:
                    s.send(b"G")
                except OSError:
                    dropped.set()
                    return

    dribbler = threading.Thread(target=dribble)
    dribbler.start()
    try:
        time.sleep(0.5)  # it is connected and sending
        assert lazyfs_cli(*RUN, tag, "--", "cat", "/data/x", timeout=30).stdout == "x\n"
        forked = _status()["agent"]["runs"]["forked"]
        assert dropped.wait(15), "the dribbling client was never dropped"
        assert _sample(_metrics(), "lazyfs_node_forked_runs_total") == forked > 0
    finally:
        stop.set()
        dribbler.join()


def test_runs_stay_forked_after_a_run_through_cache_servers(node, tmp_path, env_dirs):
    """A fleet's pool threads live in the agent; runs are forked by its fork server, so every run
    after one through --server still takes the fast path, and the counters prove it."""
    from bench.servers import CacheServer
    local = _image(tmp_path / "a", {"x": b"local\n"})
    origin = tmp_path / "origin"
    remote = _image(tmp_path / "b", {"x": b"remote\n"}, tag="node/fleet:1")
    lazyfs_cli("build", f"dir:{tmp_path / 'b' / 'rootfs'}", "--tag", remote, "--store", origin)
    server = CacheServer(str(origin), tmp_path / "server", extra=("--no-access-log",)).start()
    try:
        lazyfs_cli(*RUN, "--server", server.url, remote, "--", "cat", "/data/x")  # starts the agent
        before = _status()["agent"]["runs"]
        outs = [lazyfs_cli(*RUN, *(("--server", server.url) if i % 2 else ()), local if i % 2 == 0 else remote,
                           "--", "cat", "/data/x").stdout for i in range(4)]
        assert outs == ["local\n", "remote\n"] * 2
        after = _status()["agent"]["runs"]
        assert (after["forked"] - before["forked"], after["fallbacks"]) == (4, 0)
        text = _metrics()
        assert _sample(text, "lazyfs_node_forked_runs_total") == after["forked"]
        assert _sample(text, "lazyfs_node_run_fallbacks_total") == 0
    finally:
        server.stop()


def test_a_cold_mount_takes_the_manifest_the_agent_verified(node, tmp_path, env_dirs):
    """The agent reads and verifies the manifest to resolve the image; the mount's daemon gets
    those bytes rather than fetching them again."""
    from lazyfs.fs import control, mounts
    tag = _image(tmp_path, {"x": b"handed\n"})
    reader = _cli(*RUN, tag, "--", "sh", "-c", "cat /data/x; sleep 60")
    try:
        assert reader.stdout.readline() == "handed\n"
        (image,) = _status()["images"]
        s = control.query(image["mountpoint"])
        assert s["manifest"] == "handed"
        assert s["store"]["manifest_gets"] == (s["metadata"] == "shipped")  # only the metadata record
        state = mounts.read_state(image["mountpoint"])
        assert not state.kernel_layout().manifest.exists()
    finally:
        reader.kill()
        reader.wait()


def test_a_run_the_agent_cannot_fork_is_logged_and_counted(node, tmp_path, env_dirs, monkeypatch):
    tag = _image(tmp_path, {"x": b"x\n"})
    monkeypatch.setenv("LAZYFS_DAEMON_EXEC", "1")  # the agent started below forks nothing
    lazyfs_cli(*RUN, tag, "--", "true")
    r = lazyfs_cli(*RUN, tag, "--", "cat", "/data/x")
    assert r.stdout == "x\n"  # the slow path still runs it
    runs = _status()["agent"]["runs"]
    assert (runs["forked"], runs["fallbacks"]) == (0, 1)
    assert "LAZYFS_DAEMON_EXEC" in runs["last_fallback"]
    assert _sample(_metrics(), "lazyfs_node_run_fallbacks_total") == 1
    assert "takes the slow path" in _agent_log(env_dirs)
    assert "1 on the slow path" in lazyfs_cli("node", "status").stdout


def _warm_image_and_a_hole(tmp_path, monkeypatch) -> tuple[str, socket.socket]:
    """An image mounted by the agent (kept a minute), and a cache server that accepts
    connections and never answers."""
    monkeypatch.setenv("LAZYFS_NODE_IDLE", "60s")
    tag = _image(tmp_path, {"x": b"warm\n"})
    lazyfs_cli(*RUN, tag, "--", "true")
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(128)
    return tag, hole


def test_a_warm_run_does_not_wait_for_another_images_stalled_cold_mount(node, tmp_path, monkeypatch):
    tag, hole = _warm_image_and_a_hole(tmp_path, monkeypatch)
    stalled = _cli(*RUN, "--server", f"http://127.0.0.1:{hole.getsockname()[1]}", "--deadline", "60s",
                   "elsewhere/app:1", "--", "true")
    try:
        time.sleep(1.0)  # its acquire is in the agent, waiting on the hole
        assert stalled.poll() is None
        started = time.monotonic()
        r = lazyfs_cli(*RUN, tag, "--", "cat", "/data/x")
        took = time.monotonic() - started
        assert r.stdout == "warm\n"
        assert took < 10.0, f"the warm run waited {took:.1f} s behind the stalled mount"
        assert stalled.poll() is None  # (it was really still stalled all along)
    finally:
        stalled.kill()
        stalled.wait()
        hole.close()  # the agent's stalled request fails now, not at its deadline


def test_many_requests_waiting_on_one_stalled_image_leave_room_for_a_warm_run(node, tmp_path, monkeypatch):
    """Forty pods of one image whose server stalls must not leave a warm run of another image
    waiting in the agent's queue."""
    tag, hole = _warm_image_and_a_hole(tmp_path, monkeypatch)
    source = ["--server", f"http://127.0.0.1:{hole.getsockname()[1]}", "--deadline", "60"]
    waiting: list[socket.socket] = []
    try:
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX)
            waiting.append(s)
            s.connect(node["LAZYFS_NODE_SOCKET"])
            s.sendall(json.dumps({"op": "acquire", "ref": "elsewhere/app:1", "source": source}).encode() + b"\n")
        time.sleep(1.5)  # all forty are in the agent, waiting on the hole
        started = time.monotonic()
        r = lazyfs_cli(*RUN, tag, "--", "cat", "/data/x")
        took = time.monotonic() - started
        assert r.stdout == "warm\n"
        assert took < 10.0, f"the warm run waited {took:.1f} s behind requests for a stalled image"
        for s in waiting:  # (they were really still waiting all along)
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
        hole.setblocking(False)
        asked = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                hole.accept()[0].close()
                asked += 1
        assert 1 <= asked <= 2, f"forty requests for one image asked its server {asked} times"
    finally:
        for s in waiting:
            s.close()
        hole.close()  # the agent's stalled requests fail now, not at their deadline


@pytest.mark.parametrize("payload", [
    b"this is not json\n",
    b"[" * 200_000 + b"]" * 200_000 + b"\n",
    b'"a string, not an object"\n',
    b'{"op": "acquire"}\n',
    b'{"op": "acquire", "ref": 5}\n',
    b'{"op": "acquire", "ref": "x", "source": "not a list"}\n',
    b'{"op": "release"}\n',
    b'{"op": "bind", "target": ["x"]}\n',
    b'{"op": "exec", "argv": ["run"]}\n',
    b'{"op": "no such request"}\n',
    b"x" * (2 << 20),
], ids=["text", "nested", "string", "no-ref", "ref-type", "source-type", "no-lease", "target-type",
        "exec-no-fds", "unknown-op", "oversized"])
def test_a_malformed_request_gets_one_line_and_the_agent_keeps_serving(node, tmp_path, env_dirs, payload):
    tag = _image(tmp_path, {"x": b"x\n"})
    lazyfs_cli(*RUN, tag, "--", "true")  # starts the agent
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(node["LAZYFS_NODE_SOCKET"])
        try:
            s.sendall(payload)
        except BrokenPipeError:  # it answered the first megabyte and hung up, as it should
            pass
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, f"the agent hung up without an answer (got {answer[:200]!r})"
            answer += chunk
    assert answer.count(b"\n") == 1
    got = json.loads(answer)
    assert got["ok"] is False and got["kind"] == "NodeError"
    assert "Error(" not in got["error"] and "Traceback" not in got["error"], got["error"]
    assert lazyfs_cli(*RUN, tag, "--", "cat", "/data/x").stdout == "x\n"  # still serving
    assert "Traceback" not in _agent_log(env_dirs)


def _as_nobody(code: str, *args) -> subprocess.Popen:
    """A process of user nobody running ``code`` (the system's interpreter: the checkout may not
    be readable by nobody); it prints "ready" once set up."""
    proc = subprocess.Popen(["/usr/bin/python3", "-I", "-c", code, *map(str, args)], user=65534,
                            group=65534, extra_groups=[], stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline() != "ready\n":
        proc.kill()
        proc.communicate(timeout=10)
        pytest.skip("/usr/bin/python3 does not run as user nobody here")
    return proc


# Listens on a Unix socket and prints how many bytes each client sent, as another user would
# who bound an agent's or a daemon's socket first.
_LISTENER = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "s.bind(sys.argv[1].replace('@', '\\0', 1))\n"
             "s.listen(8)\n"
             "print('ready', flush=True)\n"
             "while True:\n"
             "    c, _ = s.accept()\n"
             "    c.settimeout(1)\n"
             "    got = b''\n"
             "    try:\n"
             "        c.sendall(sys.argv[2].encode())\n"
             "        while d := c.recv(65536):\n"
             "            got += d\n"
             "    except OSError:\n"
             "        pass\n"
             "    c.close()\n"
             "    print(len(got), flush=True)\n")


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="no /usr/bin/python3 to run as nobody")
def test_an_agent_socket_in_a_shared_directory(node, tmp_path, monkeypatch):
    """--socket (or LAZYFS_NODE_SOCKET) may name a directory everyone writes, /tmp say: the agent
    leaves its mode alone, and a client sends nothing (its environment, its stdio) to a socket
    another user bound there first."""
    tag = _image(tmp_path, {"x": b"x\n"})
    shared = Path(tempfile.mkdtemp(prefix="lzs-", dir="/tmp"))
    os.chmod(shared, 0o1777)
    path = shared / "node.sock"
    monkeypatch.setenv("LAZYFS_NODE_SOCKET", str(path))
    impostor = _as_nobody(_LISTENER, path, "")
    try:
        refused = lazyfs_cli(*RUN, tag, "--", "cat", "/data/x", check=False)
        assert refused.returncode != 0 and "uid 65534" in refused.stderr, refused.stderr
        assert refused.stdout == "" and "Traceback" not in refused.stderr
        impostor.kill()
        got = impostor.communicate(timeout=10)[0].split()
        assert got and set(got) == {"0"}, got  # asked (connected), and told nothing
        path.unlink()
        assert lazyfs_cli(*RUN, tag, "--", "cat", "/data/x").stdout == "x\n"  # the agent starts there
        assert oct(os.stat(shared).st_mode & 0o7777) == "0o1777"
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    finally:
        impostor.kill()
        impostor.communicate(timeout=10)
        pidfile = Path(os.environ["LAZYFS_STATE_DIR"]) / "node" / "agent.pid"
        if pidfile.exists():
            _stop(int(pidfile.read_text()))
        subprocess.run(["rm", "-rf", str(shared)])


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="no /usr/bin/python3 to run as nobody")
def test_a_daemons_control_socket_taken_by_another_user(node, tmp_path):
    """A daemon's control socket has an abstract name, which any user may bind first: its answers
    are not taken for counters, a run still ends with its container's status, and the agent
    goes on unmounting what is idle."""
    from lazyfs.fs import control

    tag = _image(tmp_path, {"x": b"x\n"})
    run = _cli(*RUN, tag, "--", "sh", "-c", "echo started; sleep 30")
    try:
        assert run.stdout.readline() == "started\n"
        mountpoint = _status()["images"][0]["mountpoint"]  # (while the run holds it)
    finally:
        run.kill()
        run.communicate(timeout=30)
    _wait(lambda: not _status()["images"], 20, "the idle unmount")
    squatter = _as_nobody(_LISTENER, "@" + control.address(mountpoint)[1:], "not counters")
    try:
        proc = lazyfs_cli(*RUN, "-v", tag, "--", "sh", "-c", "exit 7", check=False)
        assert proc.returncode == 7 and "Traceback" not in proc.stderr, proc.stderr
        assert "uid 65534" in proc.stderr  # (the warning: no counters for this run)
        _wait(lambda: not _status()["images"], 10, "the idle unmount")
    finally:
        squatter.kill()
        squatter.communicate(timeout=10)


def test_umount_of_a_relative_path_through_the_agent(node, tmp_path):
    tag = _image(tmp_path, {"m": b"mounted\n"})
    (tmp_path / "mnt").mkdir()
    lazyfs_cli("mount", tag, tmp_path / "mnt")
    try:
        subprocess.run([sys.executable, "-m", "lazyfs.cli", "umount", "mnt"], cwd=tmp_path, check=True,
                       timeout=60)
        assert not os.path.ismount(tmp_path / "mnt")
        again = subprocess.run([sys.executable, "-m", "lazyfs.cli", "umount", "mnt"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
    finally:
        lazyfs_cli("umount", tmp_path / "mnt", check=False)
    _wait(lambda: not _status()["images"], 10, "the idle unmount")


def test_a_forked_run_killed_by_a_signal_exits_as_such(node, tmp_path):
    """The agent's fork of `lazyfs run` killed outright (the OOM killer, say) cannot write its
    status: its client exits 128 + the signal, as a plain run would, not 1."""
    tag = _image(tmp_path, {"x": b"x\n"})
    lazyfs_cli(*RUN, tag, "--", "true")  # (starts the agent: the next run is a fork)
    run = _cli(*RUN, tag, "--", "sh", "-c", "echo started; sleep 60")
    try:
        assert run.stdout.readline().strip() == "started"
        [worker] = [u["pid"] for u in _status()["images"][0]["users"]]
        assert _comm(worker) == "lazyfs-run"
        os.kill(worker, signal.SIGKILL)
        _, err = run.communicate(timeout=15)
        assert run.returncode == 128 + signal.SIGKILL, err
    finally:
        run.kill()
        run.communicate(timeout=30)
    _wait(_unused, 15, "what the killed run left swept")


def test_a_forked_run_takes_on_its_clients_limits_and_gives_its_container_dockers_umask(node, tmp_path):
    """The agent's fork takes on the resource limits the run the client would have started itself
    inherits from it; on either path the container gets docker's umask, 022, whatever the
    caller's (under 027 its / came out 0750, closed to a USER other than root)."""
    tag = _image(tmp_path, {"x": b"x\n"})
    lazyfs_cli(*RUN, tag, "--", "true")  # (starts the agent: the next runs are forks)
    import resource

    def as_a_caller():
        os.umask(0o027)
        resource.setrlimit(resource.RLIMIT_NOFILE, (123, 456))
    for how in ("--node", "--no-node"):
        proc = subprocess.run([sys.executable, "-m", "lazyfs.cli", *RUN, how, "--user", "nobody", tag, "--",
                               "sh", "-c", "umask; ulimit -n; ulimit -Hn; cat /data/x"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                              preexec_fn=as_a_caller)
        assert (proc.returncode, proc.stdout.split()) == (0, ["0022", "123", "456", "x"]), (how, proc.stderr)
    assert _status()["agent"]["runs"]["forked"] == 1  # (the --node run: a fork, not the slow path)

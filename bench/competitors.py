"""What users run today, timed as the lazy modes are (bench.modes): `podman pull` + `podman run`
from the bench's registry into empty containers-storage, podman from a warm containers-storage,
and a cold containerd node pulling through the CRI (its own overlayfs snapshotter, or `lazyfs
snapshotter`) then `ctr run`. Each is started before the clock where a node runs it all the
time (containerd, the snapshotter, podman's storage), and each leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from bench.images import Workload
from bench.modes import RUN_TIMEOUT, BenchRunError, Node, Sample, timed
from bench.pagecache import drop_caches
from bench.servers import LAZYFS

PODMAN_RUN = ("podman", "--runtime", "runc", "run", "--rm", "--ulimit", "nofile=20000:20000",
              "--ulimit", "nproc=32768:32768")


def podman_pull_run(node: Node, tag: str, work: Workload) -> Sample:
    """A cold podman node: containers-storage of its own, emptied before each run, then
    `podman pull` of the image from the registry over the link and `podman run` of it."""
    root = node.home / "podman-pull"
    # podman refuses a runroot longer than 50 characters: a short one under /run, per home.
    runroot = f"/run/lazyfs-bench-{hashlib.sha256(str(node.home).encode()).hexdigest()[:12]}"
    storage = ("--root", str(root / "storage"), "--runroot", runroot)
    def empty() -> None:  # (rmi, not `system reset`: that would drop the machine's networks too)
        subprocess.run(["podman", *storage, "rmi", "--all", "--force"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(runroot, ignore_errors=True)
    empty()
    # A node's containers-storage is set up already: made here, before the clock (an empty
    # one's first command makes its database and layout).
    subprocess.run(["podman", *storage, "info"], capture_output=True, check=True)
    name = f"{node.registry}/bench/{tag}:latest"
    try:
        drop_caches()
        t0 = time.monotonic()
        got = subprocess.run(["podman", *storage, "pull", "--quiet", "--tls-verify=false", name],
                             capture_output=True, text=True, timeout=RUN_TIMEOUT)
        if got.returncode != 0:
            raise BenchRunError(f"podman pull {name} failed: {got.stderr.strip()[-500:]}")
        pulled = time.monotonic() - t0
        cmd = [PODMAN_RUN[0], *storage, *PODMAN_RUN[1:], "--network", "host" if work.http_port else "none",
               name, *work.argv]
        seconds, _ = timed(cmd, work, t0)
    finally:
        empty()
    return Sample(seconds, None, None, None,
                  phases={"download_s": round(pulled, 3), "run_s": round(seconds - pulled, 3)})


def containerd_run(node: Node, tag: str, work: Workload, lazy: bool) -> Sample:
    """A cold containerd node: a containerd of its own (started, like the snapshotter, before
    the clock: a node runs them all the time), a CRI pull of the image over the link, and
    `ctr run` of the workload. ``lazy``: through `lazyfs snapshotter` with an empty node cache;
    else containerd's own overlayfs snapshotter (every layer downloaded and unpacked)."""
    from bench import containerd as ctrd
    home = node.home / "containerd"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    sock = Path(f"/run/lazyfs-bench-{uuid.uuid4().hex[:8]}.sock")  # Unix socket paths are short
    snapshotter = None
    if lazy:
        log_path = node.home / "containerd-snapshotter.log"  # kept: it outlives the node
        with open(log_path, "ab") as log:
            snapshotter = subprocess.Popen(
                [*LAZYFS, "snapshotter", "--socket", str(sock), "--root", str(home / "snapshotter"),
                 "--server", node.server_url, "--cache-dir", str(node.cold_cache()),
                 "--data-path", node.data_path, "--profile", "none"],  # as the lazy mode: no profile
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if snapshotter.poll() is not None or time.monotonic() > deadline:
                snapshotter.kill()
                raise BenchRunError(f"the snapshotter did not start; see {log_path}")
            time.sleep(0.02)
    daemon = ctrd.Containerd(home / "ctrd", sock, node.registry, "lazyfs" if lazy else "overlayfs")
    name = f"{node.registry}/bench/{tag}:latest"
    try:
        daemon.start()
        drop_caches()
        t0 = time.monotonic()
        daemon.cri_pull(name, timeout=RUN_TIMEOUT)
        pulled = time.monotonic() - t0
        cmd = [ctrd.CTR, "-a", str(daemon.socket), "-n", ctrd.NAMESPACE, "run", "--rm",
               "--snapshotter", "lazyfs" if lazy else "overlayfs",
               *(["--net-host"] if work.http_port else []), name, f"bench-{uuid.uuid4().hex[:8]}",
               *work.argv]
        seconds, _ = timed(cmd, work, t0)
    finally:
        # Removing the images removes their snapshots, which hand back their mounts' leases.
        images = daemon.ctr("images", "ls", "-q", check=False).stdout.split()
        if images:
            daemon.ctr("images", "rm", "--sync", *images, check=False)
        daemon.stop()
        if snapshotter is not None:
            snapshotter.terminate()
            snapshotter.wait(30)
        sock.unlink(missing_ok=True)
        shutil.rmtree(home, ignore_errors=True)
    return Sample(seconds, None, None if not lazy else 0, None if not lazy else 0,
                  phases={"pull_s": round(pulled, 3), "run_s": round(seconds - pulled, 3)})


def podman_image_run(node: Node, tag: str, work: Workload) -> Sample:
    """`podman run` of the image already in containers-storage (loaded once from the bench's
    OCI layout with skopeo): a warm podman node, the yardstick for warm-node-podman."""
    name = f"localhost/lazyfs-bench-{tag}:latest"
    if subprocess.run(["podman", "image", "exists", name]).returncode != 0:
        from bench.images import Images
        subprocess.run(["skopeo", "copy", "--quiet", f"oci:{Images(node.home).layout}:{tag}",
                        f"containers-storage:{name}"],
                       check=True, capture_output=True)
    cmd = [*PODMAN_RUN, "--network", "host" if work.http_port else "none", name, *work.argv]
    drop_caches()
    t0 = time.monotonic()
    seconds, _ = timed(cmd, work, t0)
    return Sample(seconds)

"""Container runtimes: podman (with runc) where present, else Linux namespaces + chroot.

Facts this relies on, measured on Debian 12 workers: crun refuses hybrid cgroup layouts, so podman
is told to use runc; podman's default rlimits are refused without CAP_SYS_RESOURCE, so nofile is
capped at the caller's hard limit and nproc is given explicitly.
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lazyfs.errors import RunError

NETWORKS = ("none", "host")  # what --network takes: a network of its own (empty), or the host's

NPROC = 32768


@dataclass
class Spec:
    argv: list[str]
    env: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str = ""
    tty: bool = False
    network: str = "none"
    hostname: str = "lazyfs"


def available() -> dict[str, str | None]:
    podman, runc = shutil.which("podman"), shutil.which("runc")
    return {
        "podman": None if podman and runc else "podman and runc are needed (apt-get install podman runc)",
        "namespaces": None if shutil.which("unshare") else "unshare (util-linux) is missing",
    }


def choose(name: str) -> str:
    avail = available()
    if name == "auto":
        for candidate in ("podman", "namespaces"):
            if avail[candidate] is None:
                return candidate
        raise RunError("no container runtime: " + "; ".join(v for v in avail.values() if v))
    if name not in avail:
        raise RunError(f"unknown runtime {name!r} (use auto, podman or namespaces)")
    if avail[name]:
        raise RunError(f"runtime {name} unavailable: {avail[name]}")
    return name


def command(runtime: str, rootfs: Path, spec: Spec, name: str) -> list[str]:
    if runtime == "podman":
        return podman_command(rootfs, spec, name)
    return namespaces_command(rootfs, spec)


FORCE_STOP_TIMEOUT = 10.0  # seconds `podman rm -f` may take before lazyfs gives up on it


def force_stop(runtime: str, name: str) -> None:
    """Kill a container whose runtime client was killed or died (podman's conmon outlives it;
    unshare takes its children down itself through --kill-child). Bounded: a Ctrl-C must end
    `lazyfs run` within seconds, whatever podman is doing."""
    if runtime != "podman":
        return
    try:
        subprocess.run(["podman", "--runtime", shutil.which("runc") or "runc", "rm", "-f", "-t", "0",
                        name], capture_output=True, timeout=FORCE_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass  # the overlay is then detached lazily; the container's end frees it


def outlived(runtime: str, name: str) -> bool:
    """Whether the container ``name`` still exists after its runtime client exited. podman's
    conmon keeps a container going when the client dies while starting it (a Ctrl-C reaches
    the whole foreground process group); its mount namespace would then pin the image mount."""
    if runtime != "podman":
        return False  # unshare --kill-child and the PID namespace take everything down
    return name in conmon_containers()


def conmon_containers() -> set[str]:
    """Names of the containers a conmon is running: a scan of /proc that costs milliseconds,
    where a podman call costs a tenth of a second."""
    names = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if os.path.basename(args[0]) == b"conmon" and b"-n" in args[:-1]:
            names.add(args[args.index(b"-n") + 1].decode(errors="replace"))
    return names


def podman_command(rootfs: Path, spec: Spec, name: str) -> list[str]:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
    cmd = ["podman", "--runtime", shutil.which("runc") or "runc", "run", "--rm", "-i", "--name", name,
           "--network", spec.network, "--hostname", spec.hostname,
           "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={NPROC}:{NPROC}",
           "--workdir", spec.workdir or "/"]
    if spec.tty:
        cmd.append("-t")
    if spec.user:
        cmd += ["--user", spec.user]
    for kv in spec.env:
        cmd += ["--env", kv]
    # --rootfs makes the first positional argument the root directory; the rest is the command.
    return cmd + ["--rootfs", str(rootfs), *spec.argv]


def namespaces_command(rootfs: Path, spec: Spec) -> list[str]:
    # New mount, PID, UTS and IPC namespaces; lazyfs.runner.nsinit sets up /proc and /dev inside
    # and chroots. The network namespace is shared unless "none" is asked for.
    cmd = ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--uts", "--ipc",
           "--propagation", "private"]
    if own_network(spec):
        cmd.append("--net")
    return cmd + nsinit_command(rootfs, spec)


def own_network(spec: Spec) -> bool:
    """Whether the namespaces runtime gives the container a network namespace of its own
    (--network none) rather than the host's (host); anything else is refused, never taken
    for the host's."""
    if spec.network not in NETWORKS:
        raise RunError(f"network {spec.network!r}: the namespaces runtime has none and host")
    return spec.network == "none"


def nsinit_command(rootfs: Path, spec: Spec, *extra: str) -> list[str]:
    """lazyfs.runner.nsinit's command line for a spec (``extra``: more nsinit options)."""
    from lazyfs.runner import nsinit
    return [sys.executable, "-I", "-S", nsinit.__file__, *nsinit.command_line(rootfs, spec, *extra)]


def start(runtime: str, rootfs: Path, spec: Spec, name: str, started: list) -> None:
    """Start the container and append its handle to ``started``: a Popen, or for the namespaces
    runtime in a single-threaded caller a forked equivalent of `unshare` + nsinit
    (lazyfs.runner.nsfork) that skips two program starts. The handle is recorded before a Ctrl-C
    can interrupt, so the caller can always stop what started."""
    if runtime == "namespaces":
        from lazyfs.proc import spawn
        if spawn.single_threaded():
            from lazyfs.runner import nsfork
            nsfork.start(rootfs, spec, started)
            return
    started.append(subprocess.Popen(command(runtime, rootfs, spec, name)))

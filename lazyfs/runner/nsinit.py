"""Runs inside fresh namespaces (started by `unshare`): mount /proc and a minimal /dev in the
container root, chroot, drop to the image's user, exec the command. Internal to `lazyfs run`."""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def setup(root: str, hostname: str | None) -> None:
    for d in ("proc", "dev", "tmp"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", os.path.join(root, "proc"))
    dev = os.path.join(root, "dev")
    _mount("-t", "tmpfs", "-o", "nosuid,mode=755,size=64k", "tmpfs", dev)
    for name in DEVICES:
        target = os.path.join(dev, name)
        open(target, "a").close()
        _mount("--bind", f"/dev/{name}", target)
    os.makedirs(os.path.join(dev, "shm"))
    _mount("-t", "tmpfs", "-o", "nosuid,nodev", "tmpfs", os.path.join(dev, "shm"))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    if hostname:
        socket.sethostname(hostname)


def _ids(user: str) -> tuple[int | None, int | None]:
    if not user:
        return None, None
    name, _, group = user.partition(":")
    uid = int(name) if name.isdigit() else _lookup("/etc/passwd", name, 2)
    gid = int(group) if group.isdigit() else (_lookup("/etc/group", group, 2) if group else
                                              _lookup("/etc/passwd", name, 3) if not name.isdigit() else uid)
    return uid, gid


def _lookup(db: str, name: str, column: int) -> int:
    with open(db) as f:  # read after chroot: the image's own user database
        for line in f:
            fields = line.rstrip("\n").split(":")
            if fields[0] == name:
                return int(fields[column])
    raise SystemExit(f"lazyfs: error: user or group {name!r} not found in the image's {db}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rootfs", required=True)
    p.add_argument("--workdir", default="/")
    p.add_argument("--hostname", default="lazyfs")
    p.add_argument("--user", default="")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--setsid", action="store_true", help="lead a new session (CRIU needs it)")
    p.add_argument("--stdio", help="append stdout and stderr to this file; stdin from /dev/null")
    p.add_argument("argv", nargs="+")
    a = p.parse_args()
    if a.setsid:
        os.setsid()
    if a.stdio:
        out = os.open(a.stdio, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(null)
    setup(a.rootfs, a.hostname)
    os.chroot(a.rootfs)
    os.chdir(a.workdir)
    uid, gid = _ids(a.user)
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
    env = dict(kv.split("=", 1) for kv in a.env if "=" in kv)
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    try:
        os.execvpe(a.argv[0], a.argv, env)
    except OSError as exc:
        print(f"lazyfs: error: cannot run {a.argv[0]!r} in the image: {exc.strerror}", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main()

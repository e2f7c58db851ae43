"""Runs inside fresh namespaces (started by `unshare`): mount /proc and a minimal /dev in the
container root, chroot, drop to the image's user, exec the command. Internal to `lazyfs run`.

It is run as a script with `python -I -S` and imports only the standard library, and it mounts
with mount(2) rather than mount(8): an interpreter with site-packages and nine mount processes
cost about 80 ms of every container start."""
from __future__ import annotations

import _signal
import os
import sys
import warnings  # noqa: F401 - os.execvpe imports it lazily, after the chroot, where it is not

if not __package__:  # run as a script (python -I -S adds no path): lazyfs is three levels up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from lazyfs.proc import syscalls as sc  # noqa: E402 - standard library only, like this module
from lazyfs.proc.syscalls import MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID  # noqa: E402

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    try:
        sc.mount(source, target, fstype, flags, data)
    except OSError as exc:
        raise SystemExit(f"lazyfs: error: in the container: {exc.strerror}") from None


def setup(root: str, hostname: str | None) -> None:
    for d in ("proc", "dev", "tmp"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    _mount("proc", os.path.join(root, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = os.path.join(root, "dev")
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755,size=64k")
    for name in DEVICES:
        target = os.path.join(dev, name)
        open(target, "a").close()
        _mount(f"/dev/{name}", target, None, MS_BIND)
    os.makedirs(os.path.join(dev, "shm"))
    _mount("tmpfs", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    if hostname:
        try:
            sc.sethostname(hostname)
        except OSError as exc:
            raise SystemExit(f"lazyfs: error: {exc.strerror}") from None


MAX_ID = 2 ** 32 - 2  # (2^32 - 1 is the kernel's "no id")


def _ids(user: str) -> tuple[int | None, int | None]:
    if not user:
        return None, None
    name, _, group = user.partition(":")
    uid = _number(name) if _digits(name) else _lookup("/etc/passwd", name, 2)
    gid = _number(group) if _digits(group) else (_lookup("/etc/group", group, 2) if group else
                                                 _lookup("/etc/passwd", name, 3) if not _digits(name) else uid)
    return uid, gid


def _digits(value: str) -> bool:
    return value.isascii() and value.isdigit()  # (str.isdigit takes "²" and "١٢" too)


def _number(value: str) -> int:
    if int(value) > MAX_ID:
        raise SystemExit(f"lazyfs: error: user or group id {value} is out of range (at most {MAX_ID})")
    return int(value)


def _lookup(db: str, name: str, column: int) -> int:
    try:
        with open(db, errors="surrogateescape") as f:  # read after chroot: the image's own database
            for line in f:
                fields = line.rstrip("\n").split(":")
                if fields[0] == name:
                    if len(fields) <= column or not _digits(fields[column]):
                        raise SystemExit(f"lazyfs: error: the image's {db} has a malformed line for {name!r}")
                    return _number(fields[column])
    except OSError as exc:
        raise SystemExit(f"lazyfs: error: cannot look up user or group {name!r}: the image's {db}: "
                         f"{exc.strerror}") from None
    raise SystemExit(f"lazyfs: error: user or group {name!r} not found in the image's {db}")


def _enter_workdir(workdir: str) -> None:
    """As docker does: a working directory the image lacks is made (as root, before the switch)."""
    try:
        try:
            os.chdir(workdir)
        except FileNotFoundError:
            os.makedirs(workdir, exist_ok=True)
            os.chdir(workdir)
    except OSError as exc:
        raise SystemExit(f"lazyfs: error: working directory {workdir!r} in the image: {exc.strerror}") from None


def command_line(rootfs, spec, *extra: str) -> list[str]:
    """nsinit's arguments for a container spec (lazyfs.runner.runtime.Spec; ``extra``: more
    options), as Args reads them back."""
    cmd = [*extra, "--rootfs", str(rootfs), "--workdir", spec.workdir or "/", "--hostname", spec.hostname]
    if spec.user:
        cmd += ["--user", spec.user]
    for kv in spec.env:
        cmd += ["--env", kv]
    return cmd + ["--", *spec.argv]


class Args:
    """nsinit's command line (written by lazyfs.runner.runtime.nsinit_command): --rootfs DIR
    [--workdir DIR] [--hostname NAME] [--user USER[:GROUP]] [--env K=V]... [--setsid] (lead a new
    session: CRIU needs it) [--stdio FILE] (stdout and stderr appended to FILE, stdin /dev/null)
    -- ARGV... Parsed by hand: argparse alone costs 20 ms of every container start."""

    def __init__(self, argv: list[str]):
        self.rootfs, self.workdir, self.hostname, self.user = "", "/", "lazyfs", ""
        self.env: list[str] = []
        self.setsid, self.stdio = False, None
        if "--" not in argv:
            raise SystemExit("lazyfs nsinit: no command (-- ARGV...)")
        split = argv.index("--")
        opts, self.argv = argv[:split], argv[split + 1:]
        i = 0
        while i < len(opts):
            name = opts[i]
            if name == "--setsid":
                self.setsid, i = True, i + 1
                continue
            if name not in ("--rootfs", "--workdir", "--hostname", "--user", "--env", "--stdio") \
                    or i + 1 >= len(opts):
                raise SystemExit(f"lazyfs nsinit: bad option {name!r}")
            value, i = opts[i + 1], i + 2
            if name == "--env":
                self.env.append(value)
            else:
                setattr(self, name[2:], value)
        if not self.rootfs or not self.argv:
            raise SystemExit("lazyfs nsinit: --rootfs and a command are required")


def main() -> None:
    enter(Args(sys.argv[1:]))


def enter(a: Args) -> None:
    """Set up the container root, chroot, drop privileges, exec; returns only by SystemExit.
    Runs as the container's PID 1: in this script, or in a fork (lazyfs.runner.nsfork)."""
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
    if not a.workdir.startswith("/"):
        # chroot leaves the working directory outside the root: a relative one would be found
        # there, in the host's tree (lazyfs.runner.session makes the image's absolute)
        raise SystemExit(f"lazyfs: error: working directory {a.workdir!r} is not an absolute path")
    setup(a.rootfs, a.hostname)
    os.chroot(a.rootfs)
    _enter_workdir(a.workdir)
    uid, gid = _ids(a.user)
    # Changing ids clears the parent-death signal (the kernel's commit_creds), which is what
    # takes the container with a `lazyfs run` that was SIGKILLed: set again once they changed.
    dies_with_parent = sc.parent_death_signal()
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
    if dies_with_parent:
        sc.die_with_parent(dies_with_parent)
    env = dict(kv.split("=", 1) for kv in a.env if "=" in kv)
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    # Python starts with SIGPIPE and SIGXFSZ ignored, and an ignored signal stays ignored across
    # exec: the container's `yes | head -1` would see EPIPE errors instead of a quiet SIGPIPE.
    for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):
        _signal.signal(sig, _signal.SIG_DFL)
    os.umask(0o022)  # a container's, as docker and podman give it, whatever its caller's
    try:
        os.execvpe(a.argv[0], a.argv, env)
    except ValueError as exc:  # (a NUL in an argument or the environment)
        print(f"lazyfs: error: cannot run {a.argv[0]!r}: {exc}", file=sys.stderr)
        sys.exit(127)
    except OSError as exc:
        print(f"lazyfs: error: cannot run {a.argv[0]!r} in the image: {exc.strerror}", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main()

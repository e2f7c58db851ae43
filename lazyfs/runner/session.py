"""One `lazyfs run`: mount the image, add a writable layer, run the command, always clean up."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lazyfs import paths
from lazyfs.errors import LazyfsError, MountError, RunError
from lazyfs.fs import mounts
from lazyfs.fs import control
from lazyfs.proc import spawn
from lazyfs.runner import helper, runtime as rt
from lazyfs.runner.overlay import Overlay
from lazyfs.source.spec import Source
from lazyfs.records import objects

log = logging.getLogger("lazyfs.run")
STOP_GRACE = 2.0  # seconds between Ctrl-C, SIGTERM and SIGKILL


@dataclass
class RunOptions:
    ref: str
    argv: list[str]
    source: Source = field(default_factory=Source)
    cache_dir: str | None = None
    runtime: str = "auto"
    upper: str | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    network: str = "none"
    tty: bool = False
    report: Callable[[dict], None] | None = None  # gets the mount's counters after the command
    trace: str | None = None  # record every read of the image (lazyfs mount --trace)
    profile: str = "auto"  # startup profile to prefetch (lazyfs mount --profile)
    data_path: str = "auto"  # lazyfs mount --data-path
    complete: bool = False  # lazyfs mount --complete
    stop_after: float | None = None  # send the command SIGTERM after this many seconds
    prepare_upper: Callable[[Path], None] | None = None  # add files to the writable layer first
    node: bool = True  # share the image's mount through the node agent (lazyfs.node), if enabled


def container_spec(config: dict, opts: RunOptions) -> rt.Spec:
    """Docker semantics: an entrypoint stays, a given command replaces Cmd."""
    entrypoint = list(config.get("Entrypoint") or [])
    argv = entrypoint + (opts.argv or list(config.get("Cmd") or []))
    if not argv:
        raise RunError(f"{opts.ref} has no Entrypoint or Cmd; give a command after --")
    return rt.Spec(argv=argv, env=helper.with_python_path(list(config.get("Env") or []) + opts.env),
                   # (a relative WorkingDir in an image's config is taken from the root, as runc does)
                   workdir=opts.workdir or os.path.join("/", config.get("WorkingDir") or "/"),
                   user=opts.user if opts.user is not None else config.get("User", ""),
                   tty=opts.tty, network=opts.network)


def resolve(opts: RunOptions) -> tuple[str, rt.Spec]:
    """The manifest digest of opts.ref and the container spec its config gives."""
    reader = opts.source.open()
    try:
        digest, config = objects.resolve_image(reader, opts.ref)
        return digest, container_spec(config, opts)
    finally:
        reader.close()


def uses_node(opts: RunOptions) -> bool:
    """Whether this run shares the image's mount through the node agent. A trace must see every
    read of one run, so it mounts on its own."""
    if not opts.node or opts.trace:
        return False
    from lazyfs.node import client
    return client.enabled()


OWNER = "owner.json"  # in a run's directory: who made it (pid, start time) and with which runtime


def as_docker_makes_them() -> None:
    """Make what a container sees of the run's own (its writable layer, whose mode its / takes,
    the snapshot helper's layer) under docker's umask, 022, whatever the caller's: under 027 the
    container's / came out 0750, closed to any USER but root."""
    os.umask(0o022)


def run(opts: RunOptions, say=lambda msg: None) -> int:
    as_docker_makes_them()
    runtime = rt.choose(opts.runtime)
    sweep_killed_runs()
    rundir = paths.state_dir() / "run" / uuid.uuid4().hex[:12]
    with shared_image(opts, opts.profile, workload_of(opts)) as lease:
        return _run(opts, runtime, rundir, lease, say)


@contextmanager
def shared_image(opts: RunOptions, profile: str, workload: str | None = None):
    """The image's mount through the node agent, leased to this process for the block (the
    agent also drops the lease when this process exits): the agent's answer (digest,
    mountpoint, config, lease), or None when this run mounts on its own (uses_node)."""
    if not uses_node(opts):
        yield None
        return
    from lazyfs.node import client
    lease = client.acquire(opts.ref, opts.source, opts.cache_dir, opts.data_path, profile,
                           opts.complete, workload)
    try:
        yield lease
    finally:
        with _uninterrupted():
            try:
                client.release(lease["lease"])
            except LazyfsError as exc:  # the agent also drops it when it sees this process exit
                log.warning("handing back the image mount: %s", exc)


def workload_of(opts: RunOptions) -> str:
    """The key a run's startup profile is learnt and found under: its command as given (none:
    the image's own command)."""
    from lazyfs.format.profile import workload_key
    return workload_key(list(opts.argv))


def _run(opts: RunOptions, runtime: str, rundir: Path, lease: dict | None, say) -> int:
    if lease is None:
        digest, spec = resolve(opts)
        image_mnt = rundir / "image"
    else:
        digest, spec = lease["digest"], container_spec(lease["config"], opts)
        image_mnt = Path(lease["mountpoint"])
    rundir.mkdir(parents=True)
    spawn.write_owner(rundir / OWNER, runtime=runtime)
    image_mnt.mkdir(exist_ok=True)
    upper = Path(opts.upper).absolute() if opts.upper else rundir / "upper"
    # The snapshot helper in a read-only layer of its own above the image: importable in every
    # run, never written into the image or the user's --upper.
    helper_layer = rundir / "helper"
    helper.install(helper_layer)
    overlay = Overlay([helper_layer, image_mnt], upper, rundir / "work", rundir / "rootfs")
    if opts.prepare_upper:
        upper.mkdir(parents=True, exist_ok=True)
        opts.prepare_upper(upper)
    name = f"lazyfs-{rundir.name}"
    stopped = threading.Event()  # set by a Ctrl-C or a stop: the runtime may not have finished
    try:
        if lease is None:
            state = mounts.mount(digest, str(image_mnt), opts.source, opts.cache_dir, str(rundir / "mount.log"),
                                 trace=opts.trace, profile=opts.profile, checked=True,
                                 data_path=opts.data_path, complete=opts.complete,
                                 workload=workload_of(opts))
            say(f"mounted {opts.ref} ({digest[:19]}) on {image_mnt} (daemon {state.pid}, data path "
                f"{state.layout})")
            if not opts.upper:  # (a kept --upper must stay usable on any image's mount: see below)
                overlay.sit_on(mounts.data_layers(str(image_mnt)), keep=1)
        else:
            say(f"{'mounted' if lease['mounted'] else 'sharing'} {opts.ref} ({digest[:19]}) on "
                f"{image_mnt} through the node agent (daemon {lease['daemon_pid']}, data path "
                f"{lease['layout']})")
            if not opts.upper:
                # With metacopy, a chmod in the container leaves a data-less stub in the upper
                # directory: fine for a run's own upper, which goes with it, not for a kept one.
                overlay.sit_on(lease.get("data_layers"), keep=1)
        rootfs = overlay.mount()
        say(f"writable layer {upper}; runtime: " + (
            "podman with runc (--rootfs)" if runtime == "podman" else "namespaces (unshare + chroot)"))
        code = _supervise(lambda started: rt.start(runtime, rootfs, spec, name, started),
                          lambda: rt.force_stop(runtime, name), stopped, opts.stop_after, say)
        if opts.report:
            # The counters are a report on the run, never its outcome: the container's status stands.
            try:
                counters = control.query(str(image_mnt))
            except MountError as exc:
                log.warning("no counters for this run: %s", exc)
            else:
                opts.report(counters)
        return code
    except BaseException:
        stopped.set()
        raise
    finally:
        with _uninterrupted():
            _teardown(runtime, name, overlay, image_mnt if lease is None else None, stopped.is_set())
            # A user-given --upper lives outside rundir and is kept; everything in rundir goes.
            spawn.remove_owned(rundir, OWNER)


def sweep_killed_runs() -> int:
    """Tear down what runs killed with SIGKILL left in <state>/run: a run tears its directory
    down itself on any other end (_teardown), but SIGKILL gives it no chance, and its overlay (and,
    without the node agent, its image's mount) would stay mounted for good. Only directories
    whose owner is known and gone: one still being set up, or from a live run, is never touched,
    and one whose container still uses it is left for a later run to try again. Returns how
    many were left so."""
    try:
        entries = list(os.scandir(paths.state_dir() / "run"))
    except OSError:  # none yet, or not ours to read (the run itself then says why it cannot run)
        return 0
    left = 0
    for entry in entries:
        try:
            left += not _sweep(Path(entry.path))
        except (LazyfsError, OSError) as exc:  # a leftover must not stop this run
            log.warning("%s: cannot remove what a killed run left: %s", entry.path, exc)
    return left


def _sweep(rundir: Path) -> bool:
    """False when what a killed run left there is still in use."""
    owner = spawn.gone_owner(rundir / OWNER)
    if owner is None or not isinstance(owner.get("runtime"), str):
        return True  # running, or being set up (or not a run's directory): not ours to judge
    pid, runtime = owner["pid"], owner["runtime"]
    name = f"lazyfs-{rundir.name}"
    if rt.outlived(runtime, name):
        rt.force_stop(runtime, name)
    if not Overlay([], rundir / "upper", rundir / "work", rundir / "rootfs").unmount(detach_if_busy=False):
        log.warning("%s: left by a killed run (pid %d), still in use by its container; "
                    "trying again at the next run", rundir, pid)
        return False
    _unmount_image(rundir / "image")  # (only a run without the node agent mounts it there)
    spawn.remove_owned(rundir, OWNER)
    log.warning("removed what a run killed without tearing down left (pid %d): %s", pid, rundir)
    return True


@contextmanager
def _uninterrupted():
    """Hold off Ctrl-C while a run tears down (bounded: seconds): a second Ctrl-C there would
    leave mounts behind instead of ending the run sooner."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _teardown(runtime: str, name: str, overlay: Overlay, image_mnt: Path | None, stopped: bool) -> None:
    """Everything a run set up goes, whatever happened. A Ctrl-C reaches podman too, and one
    that comes while it starts the container kills the client and leaves the container behind
    (created, or running under conmon, its mount namespace pinning the image mount)."""
    if rt.outlived(runtime, name) or not overlay.unmount(detach_if_busy=False):
        log.warning("container %s outlived its runtime; stopping it", name)
        rt.force_stop(runtime, name)
    elif stopped:
        rt.force_stop(runtime, name)  # a container podman created but never started
    overlay.unmount()
    if image_mnt is not None:  # (None: the node agent's shared mount, handed back, not unmounted)
        _unmount_image(image_mnt)


def _unmount_image(image_mnt: Path) -> None:
    # Whether the mount got as far as mounting is asked of the kernel, not of a flag: a Ctrl-C
    # can land between the daemon answering and mount() returning.
    if mounts.mount_entry(str(image_mnt)) or mounts.is_stale(str(image_mnt)):
        try:
            mounts.umount(str(image_mnt), lazy=True)
        except Exception as exc:  # cleanup must go on; report, don't mask the run's outcome
            log.warning("unmounting %s: %s", image_mnt, exc)


def _supervise(start, force_stop, stopped: threading.Event, stop_after: float | None = None,
               say=lambda msg: None) -> int:
    """Run the runtime; forward SIGTERM/SIGHUP. On Ctrl-C the container got SIGINT from the
    terminal; a PID 1 that ignores it is sent SIGTERM, then stopped by force, so a run always ends.
    ``stopped`` is set when the run was stopped rather than left to end by itself."""
    started: list = []  # the handle, which start() records before a Ctrl-C can land
    try:
        start(started)
    except KeyboardInterrupt:
        if not started:
            raise
        stopped.set()  # a Ctrl-C while the container started: stop what did start
        code = _stop(started[0], force_stop) or 128 + signal.SIGINT
        return 128 - code if code < 0 else code
    proc = started[0]
    say("exec: " + " ".join(map(str, proc.args)))

    def terminate() -> None:
        """docker-stop semantics: SIGTERM, SIGKILL after STOP_GRACE."""
        stopped.set()
        _sigterm(proc)
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            force_stop()
    timer = threading.Timer(stop_after, terminate) if stop_after else None
    if timer:
        timer.daemon = True
        timer.start()

    def forward(signum, frame):
        if signum == signal.SIGTERM:
            threading.Thread(target=terminate, daemon=True).start()
            return
        proc.send_signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            stopped.set()
            # A Ctrl-C'd run does not report success: podman answers 0 when the Ctrl-C came
            # while it was still creating the container, which never ran the command.
            code = _stop(proc, force_stop) or 128 + signal.SIGINT
    finally:
        if timer:
            timer.cancel()
        for s, h in old.items():
            signal.signal(s, h)
    return 128 - code if code < 0 else code


def _sigterm(proc: subprocess.Popen) -> None:
    """SIGTERM to the runtime and to the container's init: unshare ignores SIGTERM while it
    waits, so the init must get it directly (and one without a handler, as PID 1, still ignores
    it: callers escalate to SIGKILL)."""
    proc.send_signal(signal.SIGTERM)
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(x) for x in f.read().split()]
    except OSError:
        children = []
    for child in children:
        try:
            os.kill(child, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _stop(proc: subprocess.Popen, force_stop) -> int:
    for step in ("wait", "term", "kill"):
        if step == "term":
            _sigterm(proc)
        elif step == "kill":
            proc.kill()  # the client first: it may hold the container's lock
            force_stop()
        try:
            return proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:
            continue  # a second Ctrl-C moves on to the next step
    return proc.wait()

"""`lazyfs run NAME:TAG --restore SNAP`: fetch and verify a snapshot, rebuild its workspace, let
CRIU restore the process tree into a fresh PID namespace, and carry on. A restore that fails
falls back to a cold start of the same command, loudly; a snapshot of another image is refused."""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from lazyfs import paths
from lazyfs.records import profiles
from lazyfs.format import profile as proffmt
from lazyfs.errors import LazyfsError, RunError
from lazyfs.format import snapshot as snapfmt
from lazyfs.runner.session import (RunOptions, as_docker_makes_them, run as cold_run, shared_image,
                                    uses_node)
from lazyfs.records import objects
from lazyfs.proc import ident, spawn
from snapshot import criu as criu_mod
from snapshot import gpu, layer, procs, restorer, wipe
from snapshot.capture import Follower
from snapshot.files import BlockFetcher, fetch
from snapshot.lazyrestore import LazyRestoreFailed, PageServer, fetch_eager, record_working_set
from snapshot.lazyserver import Config
from snapshot.workspace import MOUNT_BASE, Workspace, sweep_abandoned

log = logging.getLogger("lazyfs.snapshot")


class SnapshotMismatch(RunError):
    """The snapshot was taken on a different image than the one asked for."""


def load(reader, image_ref: str, snap_ref: str) -> tuple[str, str, snapfmt.Snapshot]:
    """(image digest, snapshot digest, snapshot), verified; refuses a snapshot of another image.
    The image's tag is resolved beside the snapshot's (one round trip less on the start path)."""
    with ThreadPoolExecutor(1) as pool:
        image = pool.submit(objects.resolve, reader, image_ref)
        snap_digest = objects.resolve(reader, snap_ref)
        snap = snapfmt.decode(objects.read_manifest_bytes(reader, snap_digest))
        digest = image.result()
    if snap.image != digest:
        raise SnapshotMismatch(f"snapshot {snap_ref} was taken on image {snap.image}, not on "
                               f"{image_ref} ({digest}); refusing to restore it there")
    return digest, snap_digest, snap


def restore(opts: RunOptions, snap_ref: str, say=lambda m: None, lazy: bool = True,
            working_set: bool = True, progress=None) -> int:
    """``lazy``: fetch only what criu restore reads itself and serve the process's memory on
    demand; else fetch the whole snapshot before restoring. ``working_set``: with ``lazy``,
    prefetch the working set an earlier restore recorded, or record one if there is none.
    ``progress``: bars (lazyfs.cli.common.RichProgress) for the whole snapshot's fetch (--eager)."""
    as_docker_makes_them()
    snap = None
    pages = None
    # One node cache for all of it, named here: the page server streams the image's working-set
    # blocks into it for the mount, which the node agent would otherwise place by its own default.
    opts = replace(opts, cache_dir=opts.cache_dir or str(paths.default_cache_dir()))
    ws = Workspace(MOUNT_BASE / f"restore-{uuid.uuid4().hex[:16]}")
    leases = ExitStack()  # the image's shared mount, when the node agent lends it
    try:
        reader = opts.source.open()
        try:
            digest, snap_digest, snap = load(reader, opts.ref, snap_ref)
            t0 = time.monotonic()
            # The working set an earlier lazy restore recorded lists page blocks and image
            # blocks: the page server takes them all where it streams in batches, else the
            # mount takes the image's (instead of the image's own startup profile, which is for
            # starting the command, not for carrying on).
            profile = profiles.load(reader, snap_digest) if working_set else None
            known = profile is not None
        finally:
            reader.close()  # a fleet reader's threads end here, so the page server can be forked
        # After the snapshot is read, so that a cold start instead runs the snapshot's command.
        criu = criu_mod.find()
        sweep_abandoned()
        ws.claim()  # (a /run that is full or read-only: the cold start below does without it)
        record = lazy and working_set and not known
        # Where the page server streams the working set in batches, it brings the image's blocks
        # too, in one stream with the memory (lazyserver.run); else the mount prefetches them.
        mount_profile = "%s:%s" % proffmt.tag_for(snap_digest) \
            if known and not (lazy and opts.source.batches()) else "none"
        # Through the node agent, as a run mounts: on a node that restored this snapshot lately
        # the image is mounted already, and no daemon starts. A restore that records a working
        # set must see its own reads of the image (a traced mount of its own).
        shared = not record and uses_node(opts)
        if lazy:  # first, so the working set streams in while everything else happens
            images = ws.base / "snap" / "criu"
            images.mkdir(parents=True)
            pages = PageServer(Config(str(images), snap_digest, opts.source, opts.cache_dir,
                                      str(ws.base / "restored.pid"), str(ws.base / "pages.json"),
                                      working_set=working_set, record=record), ws.base / "pages.log",
                               known=(snap, profile))
        reader = opts.source.open()
        fetch_block = BlockFetcher(opts.source, opts.cache_dir, reader)
        try:
            # The image mount (a daemon start and a manifest read) overlaps the snapshot fetch.
            with ThreadPoolExecutor(1) as pool:
                mount_asked = time.monotonic()  # (a recorded working set's image clock)
                if shared:
                    mounting = pool.submit(leases.enter_context, shared_image(opts, mount_profile))
                else:
                    mounting = pool.submit(ws.mount_image, digest, opts.source, opts.cache_dir,
                                           mount_profile, _trace(ws) if record else None)
                try:
                    if lazy:
                        fetched = fetch_eager(fetch_block, snap.files, ws.base / "snap")
                    else:
                        with progress or contextlib.nullcontext() as bars:
                            tick = None if bars is None else \
                                bars.task("fetching the snapshot", sum(f.size for f in snap.files))
                            fetched = fetch(fetch_block, snap.files, ws.base / "snap", tick=tick)
                finally:
                    lease = mounting.result()
            if shared:
                if lease["digest"] != digest:  # the tag moved between the two lookups
                    raise RunError(f"{opts.ref} now names {lease['digest']}, not the snapshot's image {digest}")
                ws.use_image(lease["mountpoint"])
            fetch_s = time.monotonic() - t0
        finally:
            # Their threads end here too, so that criu restore can be forked (snapshot.restorer).
            fetch_block.close()
            reader.close()
        recording = (snap_digest, opts.source.publish_target(), mount_asked) if record else None
        return _restore(opts, criu, digest, snap, ws, fetched, fetch_s, say, pages, recording,
                        "took the node agent's mount of" if shared else "mounted")
    except SnapshotMismatch:
        ws.remove()
        raise
    except (LazyfsError, OSError) as exc:
        _abandon(ws, pages)
        leases.close()  # (the cold start takes a mount of its own)
        return _cold(opts, snap_ref, exc, snap, say)
    except BaseException:  # Ctrl-C: leave no mount (or page server) behind
        _abandon(ws, pages)
        raise
    finally:
        leases.close()


def _abandon(ws: Workspace, pages: PageServer | None) -> None:
    if pages is not None:
        pages.finish()
    ws.remove()


def _trace(ws: Workspace) -> Path:
    return ws.base / "image-trace.jsonl"


def _cold(opts: RunOptions, snap_ref: str, exc: Exception, snap, say) -> int:
    """Run the snapshot's command from scratch: ready() returns 0, no snapshot is taken."""
    print(f"lazyfs: warning: restore of snapshot {snap_ref} failed: {exc}\n"
          f"lazyfs: warning: starting {opts.ref} cold instead", file=sys.stderr, flush=True)
    return cold_run(cold_options(opts, snap), say)  # every run has the helper


def cold_options(opts: RunOptions, snap: snapfmt.Snapshot | None) -> RunOptions:
    """The run a failed restore starts instead: what the snapshot run was asked for (its
    command, environment, working directory, user and network), as `lazyfs run` takes them, so
    the image's Entrypoint comes before the command once; a command given to the restore
    replaces the snapshot's. Without the snapshot (not found), the restore's own options."""
    asked = snap.meta.get("run") if snap else None
    if asked is None:  # (a snapshot from before its run was recorded: the argv it ran)
        return replace(opts, argv=list(opts.argv or (snap.meta.get("argv", []) if snap else [])))
    return replace(opts, argv=list(opts.argv or asked["argv"]), env=list(asked["env"]),
                   workdir=asked["workdir"], user=asked["user"], network=asked["network"])


def _restore(opts, criu, digest, snap, ws: Workspace, fetched: int, fetch_s: float, say,
             pages: PageServer | None, recording: tuple[str, str | None, float] | None,
             mounted: str = "mounted") -> int:
    if pages is not None:
        pages.ready()  # (started first, it came up while the image mounted)
    try:
        pid, stdio_at, times = criu_restore(criu, digest, snap, ws, pages)
    except BaseException as exc:
        if pages is not None:
            failure = pages.finish().get("error")
            if failure and isinstance(exc, Exception):  # the cause, not criu's view of the kill
                raise LazyRestoreFailed(f"the restored process was killed: {failure}") from exc
        raise
    prepare_s, restore_s = times
    try:
        say(f"restored {snap.meta.get('ref', digest)} as pid {pid}: fetched {fetched} bytes and "
            f"{mounted} the image in {fetch_s:.2f}s, its writable layer in {prepare_s:.2f}s, criu restore "
            f"{restore_s - prepare_s:.2f}s" + (" (memory on demand)" if pages else ""))
    except BaseException:  # a Ctrl-C, or the client gone (a closed socket), before the tree is
        _kill_restored(pid, grace=0)  # waited on: it must not run on unwatched
        raise
    status: dict = {}
    trace_lines: list[str] = []
    waited = False
    try:
        with Follower(ws.stdio, stdio_at):
            code, killed = _wait(pid)
            waited = True
    finally:
        try:
            if not waited and _ours(pid):  # (a failure here: the tree must not run on unserved)
                _kill_restored(pid, grace=0)
            if pages is not None:
                status = pages.finish()
                if recording is not None and _trace(ws).exists():
                    trace_lines = _trace(ws).read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        finally:
            _reap(pid)
            ws.remove()
    if pages is None:
        return code
    if status.get("terminated"):  # (someone else's SIGTERM to the page server: a stop, not a failure)
        print(f"lazyfs: {status['error']}; the restored process was killed with it", file=sys.stderr)
        raise spawn.Terminated(signal.SIGTERM)
    if status.get("error") and killed is not False:  # the page server killed the tree (a block it could not serve)
        raise LazyRestoreFailed(f"the restored process was killed: {status['error']}")
    # The program has run to its end: nothing from here on may start it again (a cold start).
    if status.get("error"):  # (a fetch behind it that failed once it had ended)
        _warn_after(f"the page server failed: {status['error']}")
        return code
    if not status:
        _warn_after(f"the page server gave no report: {pages.failure()}")
        return code
    if status.get("failed_ahead"):  # (left missing; the process never faulted on them)
        _warn_after(f"{status['failed_ahead']} block(s) of memory fetched ahead could not be fetched, "
                    f"the last {status.get('failed_ahead_error')}; the restored process did not need them")
    try:
        if recording is not None and status.get("working_set"):
            status["working_set_recorded"] = record_working_set(
                opts.source, recording[1], recording[0], digest, status["working_set"], trace_lines,
                {"ref": snap.meta.get("ref"), "faults": status.get("faults", 0)},
                shift=recording[2] - status["t0"] if "t0" in status else None)
        say(_describe(status))
    except (LazyfsError, OSError) as exc:
        _warn_after(exc)
    return code


def _warn_after(why) -> None:
    """A warning once the restored process has ended (its exit code stands); none if stderr is
    gone too."""
    try:
        print(f"lazyfs: warning: after the restored process ended: {why}", file=sys.stderr, flush=True)
    except OSError:
        pass


def _describe(s: dict) -> str:
    mib = 1 << 20
    image = s.get("working_set_image_blocks", 0)
    return (f"lazy restore: {s.get('faults', 0)} faults fetched {s.get('demand_bytes', 0) / mib:.1f} "
            f"MiB (+{s.get('readahead_bytes', 0) / mib:.1f} MiB readahead), working set "
            f"{s.get('profile_bytes', 0) / mib:.1f} MiB of {s.get('working_set_blocks', 0)} blocks "
            f"prefetched" + (f" and {image} image blocks for the mount" if image else "")
            + (f" ({s['batched_blocks']} fetched in {s['batches']} batch requests)"
               if s.get("batches") else "")
            + f", {s.get('background_bytes', 0) / mib:.1f} MiB in the background"
            + (f"; recorded a working set of {s['working_set_recorded']} blocks"
               if s.get("working_set_recorded") else ""))


def criu_restore(criu, digest, snap, ws: Workspace, pages: PageServer | None, guard: bool = True):
    """``guard``: an eager restore's guard for the tree criu makes (snapshot.guard); CRIU's floor
    (bench.criu_floor) runs criu alone."""
    t0 = time.monotonic()
    gpu_meta = snap.meta.get("gpu")
    cuda = _check_gpus(gpu_meta) if gpu_meta else None
    snap_dir = ws.base / "snap"
    if layer.which(snap_dir) == layer.EROFS:
        ws.use_layer(snap_dir / layer.EROFS)
        ws.upper.mkdir(parents=True, exist_ok=True)
    else:
        layer.unpack_tar(snap_dir / layer.TAR, ws.upper)
    shutil.move(str(ws.base / "snap" / "stdio"), ws.stdio)
    os.chmod(ws.stdio, 0o644)  # CRIU checks an open file's mode; nsinit created it 0644
    stdio_at = ws.stdio.stat().st_size
    ws.overlay.mount()
    prepare_s = time.monotonic() - t0
    pidfile = ws.base / "restored.pid"
    wiped = snapfmt.wipe_on_fork(snap.meta)
    # criu leaves the tree stopped: it goes on once its /proc is its own and its memory a fork
    # wipes is wiped, so no task sees the host's processes, or draws on the snapshot's
    # generator state, first.
    argv = criu_mod.restore_command(criu, ws.base / "snap" / "criu", pidfile, ws.base / "restore.log",
                                    lazy=pages is not None)
    try:
        shm = snap_dir / layer.SHM
        code, printed = restorer.start(ws.base, snap.mount_path, argv, ws.base / "restorer.out",
                                       guarded=guard and pages is None,  # (a page server guards its own)
                                       shm=shm if shm.exists() else None)
    except BaseException:  # Ctrl-C under CRIU: what it restored (waiting in ready()) or was making
        procs.kill_made(os.getpid())
        raise
    if code != 0 or not pidfile.exists():  # (its tree's root is our child, pidfile or not)
        procs.kill_made(os.getpid())
        tail = criu_mod._tail(ws.base / "restore.log")
        raise criu_mod.CriuError(f"criu restore failed ({printed.strip() or code}):\n  {tail}")
    pid = int(pidfile.read_text())
    if pages is None:  # criu read every page into the tree: kept, they would be its memory twice (/run is RAM)
        for image in (snap_dir / "criu").glob("pages-*.img"):
            image.unlink(missing_ok=True)
    try:
        restorer.own_proc(pid, snap.mount_path)
        if wiped:
            wipe.wipe(pid, wiped)  # as a fork would have
            ws.write_marker("wipe-on-fork", wipe.record(wiped))  # (for ready() to mark them again)
        procs.resume(pid, criu_mod.stopped_at_dump(ws.base / "snap" / "criu"))
        if cuda is not None:
            wanted = set(gpu_meta["ns_pids"])
            for host_pid in procs.tree(pid):
                if procs.ns_pid(host_pid) in wanted:
                    cuda.resume(host_pid)  # device memory back onto the GPU, then CUDA runs
        # The process waits in snapshot.ready() for this marker; its content is this copy's identity.
        ws.write_marker("restored", f"{secrets.randbits(62)}\n")
    except BaseException:  # a restored copy that cannot go on must not linger (or run twice)
        _kill_restored(pid, grace=0)
        raise
    return pid, stdio_at, (prepare_s, time.monotonic() - t0)


def _check_gpus(meta: dict) -> "gpu.Cuda":
    here = gpu.gpu_models()
    if sorted(here) != sorted(meta.get("models", [])):
        raise gpu.GpuError(f"the snapshot holds GPU state from {', '.join(meta.get('models', [])) or '?'}; "
                           f"this machine has {', '.join(here) or 'no NVIDIA GPU'}")
    return gpu.Cuda()


STOP_GRACE = 5.0  # seconds a restored tree has to stop on Ctrl-C before it is killed


def _kill_restored(pid: int, grace: float = STOP_GRACE) -> None:
    """Stop a restored tree and reap its root. The root task is the init of a PID namespace of
    its own, which signals without a handler do not reach (SIGTERM is ignored there): SIGINT
    first, which a Python program handles (KeyboardInterrupt, as a Ctrl-C in a plain run),
    then SIGKILL. The namespace's other tasks die with their init."""
    if grace > 0:
        try:
            os.kill(pid, signal.SIGINT)
            if ident.wait_gone(pid, grace):
                return
        except ProcessLookupError:
            return
        except KeyboardInterrupt:  # a second Ctrl-C: no more grace, but the tree still goes first
            _kill_hard(pid)
            raise
    _kill_hard(pid)


def _kill_hard(pid: int) -> None:
    """SIGKILL, and wait for the tree to be gone, whatever comes meanwhile: the page server stops
    after this, and a tree still running then would read zero pages where its memory was."""
    interrupted = None
    for _ in range(3):
        try:
            os.kill(pid, signal.SIGKILL)
            ident.wait_gone(pid, 30.0)
            break
        except ProcessLookupError:
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


def _wait(pid: int) -> tuple[int, bool | None]:
    """Exit status of the restored root task (a child of ours: criu restored it as its sibling),
    and whether SIGKILL ended it (None: not known), not the same as exit(137). It is left a
    zombie for _reap: until then its pid is no other process's, so a page server that kills the
    tree as it ends (a fetch behind it failed) cannot hit a process that took the pid."""
    try:
        while True:
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
                break
            except InterruptedError:
                continue
    except KeyboardInterrupt:  # stop the tree too, and no cold start: the user asked to stop
        _kill_restored(pid)
        raise
    except ChildProcessError:  # not our child after all: until it is gone (its status is not ours)
        ident.wait_gone(pid, float("inf"))
        return 0, None
    if info.si_code == os.CLD_EXITED:
        return info.si_status, False
    return 128 + info.si_status, info.si_status == signal.SIGKILL


def _ours(pid: int) -> bool:
    """Whether ``pid`` is still a child of ours, not reaped (so its pid is still its own)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return True
    except ChildProcessError:
        return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # reaped already (a stop that waited for it), or not ours
        pass

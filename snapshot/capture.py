"""`lazyfs run --snapshot SNAP`: run a command until it calls snapshot.ready(), dump it with CRIU,
and publish the dump, its writable layer and its output so far to the store as blocks."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

from lazyfs.errors import FormatError, NotFound, RunError
from lazyfs.format import reference
from lazyfs.format import snapshot as snapfmt
from lazyfs.runner.runtime import nsinit_command, own_network
from lazyfs.runner.session import RunOptions, as_docker_makes_them, resolve
from lazyfs.records import objects
from lazyfs.store import open_store
from lazyfs.store.lease import held_when_free
from snapshot import criu as criu_mod
from snapshot import gpu, layer, procs, wipe
from snapshot.files import publish
from lazyfs.runner.helper import MARKER_DIR
from snapshot.workspace import MOUNT_BASE, Workspace, sweep_abandoned


class Follower:
    """Copies what a process appends to its output file to our stdout, from ``start`` on.
    Polled every 5 ms with one pread on a descriptor kept open: a restored server's first
    answer is what a restore is timed by, and a 50 ms poll added 25 ms to it on average."""

    POLL = 0.005

    def __init__(self, path: Path, start: int = 0):
        self.path, self.pos = path, start
        self.lost = False  # our stdout went away
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stdio", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def _pump(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return
        while not self.lost and (data := os.pread(self._fd, 1 << 16, self.pos)):
            self.pos += len(data)
            try:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            except OSError:  # our stdout is gone (`| head -1`'s reader has exited): the rest has
                self.lost = True  # nowhere to go, and the process runs on to its own end
                devnull = os.open(os.devnull, os.O_WRONLY)  # (nor does the exit's own flush)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)

    def _run(self) -> None:
        while not self._stop.wait(self.POLL):
            self._pump()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self._pump()
        if self._fd is not None:
            os.close(self._fd)


def _ns_init(unshare_pid: int, timeout: float = 5.0) -> int:
    """The PID (on the host) of the first child of `unshare --fork`: the namespace's init."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise RunError("the snapshot run's namespace init did not appear")


def _suspend_gpus(init: int) -> dict | None:
    """Move the device state of every process in the tree that uses a GPU into its host memory,
    so CRIU dumps it with the rest; None when no process uses one."""
    users = [pid for pid in procs.tree(init) if gpu.uses_gpu(pid)]
    if not users:
        return None
    cuda = gpu.Cuda()
    t0 = time.monotonic()
    for pid in users:
        cuda.suspend(pid)
    return {"ns_pids": [procs.ns_pid(p) for p in users], "models": gpu.gpu_models(),
            "driver": cuda.version, "checkpoint_s": round(time.monotonic() - t0, 3)}


def capture(opts: RunOptions, snap_ref: str, say=lambda m: None, timeout: float = 3600.0,
            progress=None) -> int:
    """``progress``: a context manager whose ``task(description, total)`` gives a callable to
    advance by bytes (the CLI's progress bars), shown while the snapshot is stored."""
    as_docker_makes_them()
    criu = criu_mod.find()
    snap = reference.parse(snap_ref)
    if snap.digest:
        raise RunError("--snapshot takes a NAME[:TAG] to publish under, not a digest")
    store = open_store(opts.source.publish_target())
    store.check(write=True)
    digest, spec = resolve(opts)
    sweep_abandoned()
    ws = Workspace(MOUNT_BASE / uuid.uuid4().hex[:16])
    ws.claim()
    try:
        ws.upper.mkdir(parents=True)
        ws.inject_helper()
        ws.open_markers()  # (a program run as another user than root writes its ready marker)
        ws.mount(digest, opts.source, opts.cache_dir)
        # spec.env already has the helper first on PYTHONPATH (session.container_spec).
        env = spec.env + [f"LAZYFS_SNAPSHOT_DIR=/{MARKER_DIR}"]
        # Own PID (and UTS, IPC) namespace so the tree can be restored with the same PIDs, and
        # its own network unless the host's was asked for (as a plain run has it); the
        # mount namespace stays the host's so CRIU need not dump mounts (see workspace.py).
        # unshare dies with this process (setpriv execs it with a parent-death signal), and the
        # program with unshare: a run killed with SIGKILL leaves no program running on its own.
        cmd = ["setpriv", "--pdeathsig", "KILL",
               "unshare", "--pid", "--fork", "--kill-child", "--uts", "--ipc",
               *(["--net"] if own_network(spec) else []),
               *nsinit_command(ws.rootfs, replace(spec, env=env), "--setsid", "--stdio", str(ws.stdio))]
        say(f"snapshot run of {opts.ref} in {ws.base}: " + " ".join(spec.argv))
        with open(ws.base / "unshare.log", "wb") as log, Follower(ws.stdio):
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
            try:
                started = time.monotonic()
                while not ws.marker("ready").exists():
                    if proc.poll() is not None:
                        raise RunError(f"the command exited with {proc.returncode} before its "
                                       "snapshot.ready() had signalled (nothing was snapshotted; "
                                       "its output says why)")
                    if time.monotonic() - started > timeout:
                        raise RunError(f"the command did not call snapshot.ready() in {timeout:.0f}s")
                    time.sleep(0.01)
                ready_s = time.monotonic() - started
                t0 = time.monotonic()
                init = _ns_init(proc.pid)
                gpu_meta = _suspend_gpus(init)
                # Left stopped as dumped, the tree's memory a fork wipes is read as it was dumped
                # (criu's images do not say), then the tree goes as a dump would have ended it.
                criu_mod.dump(criu, init, ws.base / "criu")
                try:
                    wiped = wipe.recorded(init)
                finally:
                    os.kill(init, signal.SIGKILL)  # (its PID namespace's init: the whole tree)
                dump_s = time.monotonic() - t0
                proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        shm = layer.pack_shm(ws.rootfs / "dev" / "shm", ws.base)  # (the tree is gone: it holds still)
        ws.teardown()
        names = sorted(f"criu/{p.name}" for p in (ws.base / "criu").iterdir()
                       if p.is_file() and not p.name.endswith(".log"))
        names += [layer.pack(ws.upper, ws.base), "stdio", *([shm] if shm else [])]
        t0 = time.monotonic()
        # A build's lease, from the first block to the tag: a gc must not sweep blocks this
        # snapshot finds in the store and reuses before the tag names them. The image it pins
        # was resolved before the run: it is checked to be there still, under the lease.
        with held_when_free(store, "build", ("gc",),
                            say=lambda m: print(f"lazyfs: {m}", file=sys.stderr, flush=True)) as lease:
            with progress or contextlib.nullcontext() as bars:
                # (encoding takes 3-13 ns a byte of memory: up to a minute for a process of some GB)
                tick = bars.task("storing the snapshot", sum((ws.base / n).stat().st_size for n in names)) \
                    if bars is not None else None
                files, new, total = publish(store, ws.base, names, tick)
            publish_s = time.monotonic() - t0
            meta = {"argv": spec.argv, "env": env, "workdir": spec.workdir, "ref": opts.ref,
                    # what the run was asked for, as `lazyfs run` takes it: a restore that falls back
                    # to a cold start runs the same (the image's Entrypoint is added to argv again)
                    "run": {"argv": opts.argv, "env": opts.env, "workdir": opts.workdir, "user": opts.user,
                            "network": opts.network},
                    "gpu": gpu_meta, "wipe_on_fork": wiped,
                    "seconds": {"to_ready": round(ready_s, 3), "dump": round(dump_s, 3),
                                "publish": round(publish_s, 3)}}
            manifest = snapfmt.Snapshot(digest, str(ws.base), tuple(files), time.time(), meta)
            try:  # (what no restore, listing or gc could read back is never tagged)
                record = snapfmt.encode(manifest)
                snapfmt.decode(record)
            except FormatError as exc:
                raise RunError(f"the snapshot cannot be stored: {exc}") from None
            lease.check()
            try:
                store.get_manifest(digest)  # (there: it was verified when the run resolved it)
            except NotFound:
                raise RunError(f"image {digest} was removed from {store.url} (a gc, its tag moved) "
                               "while the snapshot ran; nothing was tagged") from None
            snap_digest = objects.put_record(store, record)
            store.put_tag(snap.name, snap.tag, snap_digest)
        size = sum(f.size for f in files)
        print(f"lazyfs: snapshot {snap.name}:{snap.tag} ({snap_digest[:19]}): {size} bytes in "
              f"{len(files)} files, {new} bytes new to the store of {total} stored; ready after "
              f"{ready_s:.2f}s, dump {dump_s:.2f}s, publish {publish_s:.2f}s", file=sys.stderr)
        return 0
    finally:
        ws.remove()

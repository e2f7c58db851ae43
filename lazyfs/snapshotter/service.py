"""The gRPC adapter: containerd's Snapshots service over a Unix socket, answered by a Snapshotter.

This is the one place lazyfs errors become gRPC status codes, which containerd turns back into
its own error kinds (errdefs): NOT_FOUND, ALREADY_EXISTS (for Prepare: "skip this layer"),
FAILED_PRECONDITION, UNAVAILABLE (the store or the node agent; containerd retries later).
"""
from __future__ import annotations

import logging
import os
import socket
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from lazyfs import errors
from lazyfs.snapshotter import proto
from lazyfs.snapshotter.meta import Info
from lazyfs.snapshotter.snapshots import Snapshotter

log = logging.getLogger("lazyfs.snapshotter")
WORKERS = 16
LIST_BATCH = 100  # infos per List message (containerd reads a stream of batches)

_CODES = [  # most specific first
    (errors.SnapshotNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.SnapshotExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.SnapshotInvalid, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.SnapshotConflict, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.NodeUnavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    # The store lacks what a snapshot needs (its image swept since the pull): the snapshot
    # itself exists, and NOT_FOUND would tell containerd it does not.
    (errors.NotFound, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.LazyfsError, grpc.StatusCode.UNKNOWN),
]


def status_of(exc: BaseException) -> grpc.StatusCode:
    return next((code for kind, code in _CODES if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)


def make_servicer(snapshotter: Snapshotter):
    pb, pb_grpc, mount_pb = proto.load()

    def info_msg(info: Info):
        msg = pb.Info(name=info.name, parent=info.parent, kind=info.kind, labels=info.labels)
        msg.created_at.FromNanoseconds(int(info.created * 1e9))
        msg.updated_at.FromNanoseconds(int(info.updated * 1e9))
        return msg

    def mounts_msg(mounts):
        return [mount_pb.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]

    def answer(fn):
        name = fn.__name__

        def method(self, request, context):
            try:
                return fn(self, request)
            except Exception as exc:  # noqa: BLE001 - every error becomes a status, none a crash
                code = status_of(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", name)
                elif code not in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND):
                    log.warning("%s %s: %s", name, getattr(request, "key", ""), exc)
                context.abort(code, str(exc) or type(exc).__name__)
        method.__name__ = name
        return method

    class Servicer(pb_grpc.SnapshotsServicer):
        @answer
        def Prepare(self, r):
            return pb.PrepareSnapshotResponse(mounts=mounts_msg(snapshotter.prepare(r.key, r.parent, dict(r.labels))))

        @answer
        def View(self, r):
            return pb.ViewSnapshotResponse(mounts=mounts_msg(snapshotter.view(r.key, r.parent, dict(r.labels))))

        @answer
        def Mounts(self, r):
            return pb.MountsResponse(mounts=mounts_msg(snapshotter.mounts(r.key)))

        @answer
        def Commit(self, r):
            snapshotter.commit(r.name, r.key, dict(r.labels))
            return empty_pb2.Empty()

        @answer
        def Remove(self, r):
            snapshotter.remove(r.key)
            return empty_pb2.Empty()

        @answer
        def Stat(self, r):
            return pb.StatSnapshotResponse(info=info_msg(snapshotter.stat(r.key)))

        @answer
        def Update(self, r):
            info = snapshotter.update(r.info.name, dict(r.info.labels), list(r.update_mask.paths))
            return pb.UpdateSnapshotResponse(info=info_msg(info))

        def List(self, r, context):
            batch = []
            for info in snapshotter.list(list(r.filters)):
                batch.append(info_msg(info))
                if len(batch) == LIST_BATCH:
                    yield pb.ListSnapshotsResponse(info=batch)
                    batch = []
            if batch:
                yield pb.ListSnapshotsResponse(info=batch)

        @answer
        def Usage(self, r):
            size, inodes = snapshotter.usage(r.key)
            return pb.UsageResponse(size=size, inodes=inodes)

        @answer
        def Cleanup(self, r):
            gone = snapshotter.cleanup()
            if gone:
                log.info("cleanup removed %d directories no snapshot owned", len(gone))
            return empty_pb2.Empty()

    return Servicer(), pb_grpc


def serve(snapshotter: Snapshotter, socket_path: Path) -> grpc.Server:
    """Start serving on ``socket_path`` (root only, mode 0600); the caller waits and stops it."""
    claim(socket_path)
    servicer, pb_grpc = make_servicer(snapshotter)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS))
    pb_grpc.add_SnapshotsServicer_to_server(servicer, server)
    old = os.umask(0o177)  # the socket is born 0600: no moment where another user can connect
    try:
        server.add_insecure_port(f"unix:{socket_path}")
        server.start()
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o600)
    return server


def claim(path: Path) -> None:
    """Make ``path`` free for this snapshotter: a socket nothing answers on is stale (its
    snapshotter died) and is removed; one that answers belongs to a live snapshotter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise errors.SnapshotterUnavailable(f"a snapshotter already serves {path}; stop it first")

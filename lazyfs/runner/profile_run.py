"""`lazyfs profile`: run a workload once on a fresh mount, recording which blocks it touches
first and in what order, and publish that as the image's startup profile."""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time

from lazyfs import paths
from lazyfs.records import profiles
from lazyfs.errors import RunError
from lazyfs.format.profile import Profile
from lazyfs.fs.index import ImageIndex
from lazyfs.runner import session
from lazyfs.records import objects
from lazyfs.store.base import BlockStore


def record(opts: session.RunOptions, publish_to: BlockStore | None, say=lambda m: None) -> tuple[str, Profile]:
    """Run ``opts`` with a read trace and turn the trace into a profile; publish it if a store
    is given. Returns (profile digest or "", profile). A workload that fails publishes nothing:
    replaying the start of a failure would only prefetch the wrong thing."""
    digest, _ = session.resolve(opts)
    paths.state_dir().mkdir(parents=True, exist_ok=True)
    fd, trace = tempfile.mkstemp(prefix="profile-", suffix=".jsonl", dir=paths.state_dir())
    os.close(fd)
    try:
        # The recording run prefetches nothing, so the trace is the workload's own order.
        run_opts = dataclasses.replace(opts, ref=digest, trace=trace, profile="none")
        started = time.monotonic()
        code = session.run(run_opts, say)
        elapsed = time.monotonic() - started
        stopped = opts.stop_after is not None and elapsed >= opts.stop_after and code in (143, 137)
        if code != 0 and not stopped:
            raise RunError(f"the workload exited with code {code}; no profile recorded")
        reader = opts.source.open()
        try:
            manifest = objects.read_manifest(reader, digest)
        finally:
            reader.close()
        with open(trace, encoding="utf-8", errors="surrogateescape") as f:
            prof = profiles.record(ImageIndex(manifest), digest, f, {
                "ref": opts.ref, "argv": opts.argv, "run_seconds": round(elapsed, 3)})
    finally:
        os.unlink(trace)
    published = profiles.publish(publish_to, prof) if publish_to is not None else ""
    return published, prof

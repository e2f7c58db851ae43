"""A mount learns its workload's startup profile and hands it to the fleet (docs/format.md §9).

Every read the daemon serves names the blocks it touched; the first touch of each is recorded
(lazyfs.records.profiles.Recorder). Once the start is over (no new block for IDLE seconds, WINDOW seconds
after the first read, or at unmount, whichever comes first) the recording is contributed once,
through the mount's cache servers (a node reading a store directly learns nothing: nodes never
write a store): a server merges it into the store's profile of this image and workload, so the
next cold start of it on any node prefetches what this one read.

Blocks fetched ahead of any read (a directory's small files, when its first one is read) are
recorded as guesses: on the kernel data path the kernel reads the ones the workload needs from
the node cache, unseen, so the mount writes the guessed blocks without leaving them in the page
cache, and at the end a guess counts only if its file has pages there again (cachestat):
something read it.

On the kernel data path only misses reach the daemon, so a start that prefetched a profile sees
only what the profile lacked. With its own workload's profile it contributes just that; with
another one (the image's, say, while its workload has none yet) it contributes that profile's
blocks with its own misses, so the workload's profile starts as everything this start needed.
"""
from __future__ import annotations

import logging
import threading
import time

from lazyfs.errors import LazyfsError
from lazyfs.format import profile as proffmt
from lazyfs.format.profile import Profile
from lazyfs.records.profiles import Recorder

log = logging.getLogger("lazyfs.profile")
IDLE = 5.0  # seconds without a new block: the start is over
WINDOW = 120.0  # seconds after the first read at most
CONTRIBUTE_AT_UNMOUNT = 10.0  # seconds an unmount may wait for the contribution


class AutoProfile:
    def __init__(self, source, image_digest: str, workload: str | None, meta: dict):
        self.source, self.image, self.workload, self.meta = source, image_digest, workload, meta
        self.recorder = Recorder()
        # Whether a block fetched on a guess was read after all (the node cache's page-cache
        # residency, set by the daemon); by default every guess counts.
        self.was_read = lambda digest: True
        self.after = lambda: None  # called once the contribution is over (or skipped)
        self.recording = True  # until the contribution is made
        self.base = None  # the profile this mount prefetched, once looked up
        self.looked_up = threading.Event()  # set when the lookup is over, found or not
        self.result: dict | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._wait, name="lazyfs-learn", daemon=True)

    def start(self) -> "AutoProfile":
        self._thread.start()
        return self

    def looked(self, profile) -> None:
        """The startup profile lookup is over (``profile``: what it found, or None)."""
        self.base = profile
        self.looked_up.set()

    def _wait(self) -> None:
        """Until the start is over or the mount goes, then the one contribution."""
        rec = self.recorder
        while not self._stop.wait(0.5):
            now = time.monotonic()
            if rec.first is not None and (now - rec.last_new >= IDLE or now - rec.first >= WINDOW):
                break
        if rec.first is not None:
            self.contribute()

    def stop(self) -> None:
        """At unmount: let the contribution happen (or finish) before the source closes."""
        self._stop.set()
        self._thread.join(CONTRIBUTE_AT_UNMOUNT)

    def contribute(self) -> None:
        try:
            self._contribute()
        finally:
            self.recording = False
            self.after()

    def _contribute(self) -> None:
        self.looked_up.wait(CONTRIBUTE_AT_UNMOUNT)
        base = self.base
        own = base is not None and base.meta.get("workload") == self.workload
        start = self.recorder.profile(self.image, frozenset(b.digest for b in base.blocks)
                                      if own else frozenset(), self.meta, self.was_read)
        if base is not None and not own:  # seeded with the profile that served this start
            seen = {b.digest for b in start.blocks}
            start = Profile(self.image, start.blocks + tuple(b for b in base.blocks
                                                             if b.digest not in seen), start.meta)
        # What one start may send (a seed can be large): this start's own reads first.
        start = Profile(self.image, start.blocks[:proffmt.MAX_CONTRIBUTION], start.meta)
        if not start.blocks:
            log.info("startup profile: nothing new to contribute")
            return
        try:
            self.result = self.source.contribute_profile(self.image, start, self.workload)
            log.info("startup profile: contributed %d blocks; the image's profile now has %s "
                     "blocks over %s starts", len(start.blocks), self.result.get("blocks"),
                     self.result.get("starts"))
        except LazyfsError as exc:
            self.error = str(exc)
            log.warning("startup profile: could not contribute what this start read: %s", exc)

    def stats(self) -> dict:
        return {"recorded": len(self.recorder), "guessed": self.recorder.guessed,
                "contributed": self.result, "error": self.error}

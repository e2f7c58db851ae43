"""What the snapshotter asks of the rest of lazyfs: does the store hold a layer chain, and a lease
on that chain image's shared mount from the node agent (which keeps the mounts, as it does for
`lazyfs run`; a snapshot's lease outlives restarts of both processes: the agent keeps its table
on disk, the snapshotter keeps the lease's id in its own).
"""
from __future__ import annotations

import logging
import threading

from lazyfs.errors import LazyfsError
from lazyfs.node import client
from lazyfs.records import chains
from lazyfs.source.spec import Source

log = logging.getLogger("lazyfs.snapshotter")


class Images:
    def __init__(self, source: Source, cache_dir: str | None = None, data_path: str = "auto",
                 profile: str = "auto"):
        self.source = source
        self.cache_dir = cache_dir
        self.data_path = data_path
        self.profile = profile
        self._reader = None
        self._lock = threading.Lock()

    def reader(self):
        with self._lock:
            if self._reader is None:
                self._reader = self.source.open()
            return self._reader

    def warm(self) -> None:
        """Open the store or fleet and reach the node agent (starting it if none runs) now, at the
        snapshotter's start, so that the first pull pays for neither."""
        self.reader()
        client.call("hello")

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def chain_image(self, chain_id: str) -> str | None:
        """The lazyfs image holding exactly ``chain_id``'s content, or None if lazyfs has none.
        A store that cannot be read answers None too (containerd then unpacks the layer itself),
        and says so in the log."""
        try:
            return chains.find(self.reader(), chain_id)
        except LazyfsError as exc:
            log.warning("chain %s: the store cannot be asked (%s); containerd unpacks it", chain_id, exc)
            return None

    def acquire(self, image: str, holder: str) -> tuple[str, str]:
        """A lease for ``holder`` (a snapshot) on ``image``'s shared mount: (lease, mountpoint).
        Asking again for the same holder gives the same lease (and mounts the image again if its
        mount died)."""
        got = client.call("acquire", kind="snapshot", target=holder, ref=image, data_path=self.data_path,
                          profile=self.profile, complete=False, **client.where(self.source, self.cache_dir))
        return got["lease"], got["mountpoint"]

    def release(self, lease: str) -> None:
        client.call("release", lease=lease)

    def leases_of(self, prefix: str) -> dict[str, str]:
        """The agent's snapshot leases whose holder starts with ``prefix``: target → lease."""
        status = client.call("status")
        return {u["target"]: u["lease"] for im in status.get("images", []) for u in im["users"]
                if u["kind"] == "snapshot" and u["target"].startswith(prefix) and "lease" in u}

    def report(self, event: str, chain_id: str) -> None:
        """Count a lazy or fallback unpack in the agent's metrics and status (best effort: an agent
        that is away loses a count, never a snapshot)."""
        try:
            client.call("snapshotter", event=event, chain=chain_id)
        except LazyfsError as exc:
            log.warning("could not count a %s unpack in the node agent: %s", event, exc)

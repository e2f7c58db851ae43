"""Where a mount reads an image from: one store, or a fleet of cache servers (with an optional
origin store behind them). The same description travels to the detached daemon as arguments."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from urllib.parse import urlparse

from lazyfs import argv, paths
from lazyfs.source import defaults
from lazyfs.store import open_store
from lazyfs.source.base import BlockSource
from lazyfs.source.reader import StoreReader


@dataclass(frozen=True)
class Source:
    store: str | None = None  # with servers: the origin to fall back to (None: servers only)
    servers: tuple[str, ...] = field(default=(), metadata={"flag": "--server"})
    deadline: float = defaults.DEADLINE
    hedge_after: float = defaults.HEDGE_AFTER
    readahead: int = defaults.READAHEAD
    siblings: bool = defaults.SIBLINGS

    def open(self) -> BlockSource:
        """The BlockSource to read from: a Fleet, or a StoreReader over one store."""
        if self.servers:
            from lazyfs.source.fleet import Fleet, FleetOptions
            origin = open_store(self.store) if self.store else None
            return Fleet(list(self.servers), origin, token=paths.default_token(),
                         options=FleetOptions(hedge_after=self.hedge_after, deadline=self.deadline))
        # (a local store cannot hang on a server: its reads go without the deadline's thread hop)
        return StoreReader(open_store(self.store), deadline=self.deadline if self.remote() else None)

    def publish_target(self) -> str | None:
        """The store spec a node writes what it made (snapshots, working sets) to: the origin
        store (None: the default store), or with only a fleet, the first cache server (which
        needs the token)."""
        if self.store or not self.servers:
            return self.store
        return self.servers[0]

    def takes_profiles(self) -> bool:
        """Whether a mount reading from here contributes the startup profiles it learns: only
        through cache servers, which merge them into the store (nodes never write a store)."""
        return self.batches()

    def batches(self) -> bool:
        """Whether many blocks come in one request from here: cache servers and HTTP stores have
        a batch endpoint; a local store and S3 are read block by block."""
        return bool(self.servers) or self._scheme() in ("http", "https")

    def remote(self) -> bool:
        """Whether blocks cross a network from here, and so are worth keeping in the node cache
        (from a local store that would only copy them twice)."""
        return bool(self.servers) or self._scheme() not in ("", "file")

    def _scheme(self) -> str:
        return urlparse(self.store or paths.default_store()).scheme

    def describe(self) -> str:
        if not self.servers:
            return self.store or paths.default_store()
        return " ".join(self.servers) + (f" (origin {self.store})" if self.store else "")

    def args(self) -> list[str]:
        """This description as command-line options (lazyfs.argv)."""
        return argv.to_argv(self)

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        argv.add_arguments(Source, p)

    @classmethod
    def from_namespace(cls, a: argparse.Namespace) -> "Source":
        return argv.from_namespace(cls, a)

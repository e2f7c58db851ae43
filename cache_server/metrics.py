"""Prometheus metrics of one cache server (its own registry, so tests can run several in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lazyfs_server_requests", "HTTP requests answered",
                                ["route", "method", "code"], registry=r)
        self.response_bytes = Counter("lazyfs_server_response_bytes", "Body bytes sent", ["route"],
                                      registry=r)
        self.latency = Histogram("lazyfs_server_request_seconds", "Time to answer a request",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.cache_hits = Counter("lazyfs_server_cache_hits", "Reads answered from the disk cache",
                                  registry=r)
        self.cache_misses = Counter("lazyfs_server_cache_misses", "Reads that needed the origin",
                                    registry=r)
        self.hit_ratio = Gauge("lazyfs_server_cache_hit_ratio", "hits / (hits + misses) since start",
                               registry=r)
        self.origin_fetches = Counter("lazyfs_server_origin_fetches", "GETs sent to the origin store",
                                      ["kind"], registry=r)
        self.origin_bytes = Counter("lazyfs_server_origin_bytes", "Bytes fetched from the origin",
                                    registry=r)
        self.origin_errors = Counter("lazyfs_server_origin_errors", "Origin requests that failed",
                                     registry=r)
        self.origin_latency = Histogram("lazyfs_server_origin_seconds", "Origin fetch time",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.verify_failures = Counter("lazyfs_server_verify_failures",
                                       "Objects refused because they did not match their digest",
                                       ["source"], registry=r)
        self.cache_bytes = Gauge("lazyfs_server_cache_bytes", "Bytes in the disk cache", registry=r)
        self.cache_entries = Gauge("lazyfs_server_cache_entries", "Objects in the disk cache",
                                   registry=r)
        self.cache_capacity = Gauge("lazyfs_server_cache_capacity_bytes", "--cache-size", registry=r)
        self.evictions = Counter("lazyfs_server_cache_evictions", "Objects evicted (LRU)", registry=r)
        self.connections = Gauge("lazyfs_server_connections", "Open client connections, and "
                                 "those closed by the limits (cache_server/protocol.py)",
                                 ["state"], registry=r)
        self.profiles = Counter("lazyfs_server_profile_contributions", "Startup profiles nodes "
                                "contributed, by result (merged, refused)", ["result"], registry=r)
        self._hits = self._misses = 0
        self._evicted_seen = 0

    def connection_state(self, guard) -> None:
        for state in ("open", "refused", "evicted", "timed_out"):
            self.connections.labels(state).set(getattr(guard, state))

    def hit(self) -> None:
        self._hits += 1
        self.cache_hits.inc()
        self.hit_ratio.set(self._hits / (self._hits + self._misses))

    def miss(self) -> None:
        self._misses += 1
        self.cache_misses.inc()
        self.hit_ratio.set(self._hits / (self._hits + self._misses))

    def cache_state(self, cache) -> None:
        self.cache_bytes.set(cache.bytes)
        self.cache_entries.set(len(cache))
        evicted = cache.stats.evictions
        if evicted > self._evicted_seen:
            self.evictions.inc(evicted - self._evicted_seen)
            self._evicted_seen = evicted

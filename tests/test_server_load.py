"""A bounded load test of one cache server process on loopback (the full one is
`python -m bench.server_load --mix --clients 64 --requests 10000`, docs/benchmarks.md)."""
from __future__ import annotations

from bench.server_load import measure

RSS_BOUND = 200 * 1024 * 1024  # the server holds no bodies in memory beyond a few in flight


def test_mixed_load_has_no_errors_no_wrong_bytes_and_bounded_memory():
    r = measure(clients=16, requests=1000, size=64 * 1024, blocks=64, mix=True)
    assert r["requests"] == 1000
    assert r["errors"] == 0 and r["wrong_bytes"] == 0
    assert set(r["by_kind"]) == {"hit", "miss", "range", "batch", "head"}
    assert r["by_kind"]["miss"]["n"] == 100
    assert r["origin_fetches"] == 64 + 100  # the warm-up, then one per miss: nothing twice
    assert 0 < r["server_peak_rss_bytes"] < RSS_BOUND


def test_batches_of_cached_blocks_under_load_are_exact():
    """Batches of cached blocks (sent by sendfile from the cache files) from 4 clients at once:
    every record in order and every frame exact."""
    r = measure(clients=4, requests=60, size=64 * 1024, blocks=64, mix=False, batch=16)
    assert r["requests"] == 60 and set(r["by_kind"]) == {"batch"}
    assert r["errors"] == 0 and r["wrong_bytes"] == 0
    assert r["origin_fetches"] == 64  # the warm-up only
    assert r["frame_MB_per_s"] > 0 and r["server_cpu_s"] >= 0

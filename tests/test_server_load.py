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

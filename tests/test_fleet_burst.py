"""A reduced fleet burst: 20 node processes, each with its own empty node cache, start one image at
once through 3 cache servers over one SeaweedFS origin (the full one: `python -m bench.fleet_burst`,
100 nodes; docs/benchmarks.md)."""
from __future__ import annotations

from bench.fleet_burst import MiB, run


def test_burst_reads_correct_bytes_and_fetches_each_block_from_the_origin_once(s3_server, tmp_path):
    r = run(nodes=20, server_count=3, image_bytes=8 * MiB, work=tmp_path, s3=s3_server)
    assert r["all_nodes_correct"] and r["node_errors"] == 0
    assert r["origin_fetches"] == r["unique_blocks"]
    assert r["origin_to_unique_bytes"] <= 1.05

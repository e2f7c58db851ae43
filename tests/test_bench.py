"""`lazyfs bench` itself: one short run of every mode on the minimal image, over a real shaped
link; the results are well-formed and every ratio is computed from the measured samples."""
from __future__ import annotations

import json
import mmap
import os
import shutil
import statistics

import pytest

from bench import report
from bench.coldstart import BenchConfig
from bench.link import LinkError, rate_bits
from tests.conftest import lazyfs_cli, mount_skip_reason


def _skip_reason() -> str | None:
    for tool, pkg in (("umoci", "umoci"), ("busybox", "busybox-static"), ("tc", "iproute2"),
                      ("ip", "iproute2")):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install {pkg})"
    return mount_skip_reason()


@pytest.mark.mount
@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_every_mode_once_on_the_minimal_image(tmp_path, env_dirs):
    out = tmp_path / "out"
    res = lazyfs_cli("bench", "--workload", "minimal", "--runs", "1", "--home", tmp_path / "home",
                     "--out", out, "--link", "1gbit", "--latency", "1ms", timeout=600)
    results = json.loads((out / "results.json").read_text())
    assert results["servers_page_cache"] == "kept"  # (only the node's was dropped: bench.pagecache)
    w = results["workloads"]["minimal"]
    assert set(w["samples"]) == {"pull", "podman-pull", "containerd-pull", "containerd-lazy", "lazy",
                                 "lazy+learnt", "lazy+profile", "warm-node", "warm-node-fuse",
                                 "warm-node-podman", "podman-image", "local-erofs", "local-overlay",
                                 "local"}
    for mode, samples in w["samples"].items():
        assert len(samples) == 1 and 0 < samples[0]["seconds"] < 60, (mode, samples)
    s = w["samples"]
    assert s["pull"][0]["fetched_bytes"] >= results["images"]["minimal"]["compressed_bytes"]
    assert s["pull"][0]["phases"]["download_s"] > 0 and s["pull"][0]["requests"] >= 4
    assert 0 < s["podman-pull"][0]["phases"]["download_s"] < s["podman-pull"][0]["seconds"]
    assert 0 < s["containerd-pull"][0]["phases"]["pull_s"] < s["containerd-pull"][0]["seconds"]
    # containerd's and podman's own pulls never ask lazyfs: their bytes are not measured, not 0
    assert s["containerd-pull"][0]["requests"] is None and s["podman-pull"][0]["fetched_bytes"] is None
    assert s["containerd-lazy"][0]["fetched_bytes"] > 0  # its layers came through the cache server
    assert s["lazy"][0]["fetched_bytes"] > 0 and s["lazy"][0]["mount_s"] < s["lazy"][0]["seconds"]
    assert s["lazy"][0]["requests"] > 0 and s["lazy"][0]["read_bytes"] > 0
    assert s["warm-node"][0]["phases"]["blocks_fetched"] == 0  # the node cache had everything
    assert s["warm-node-fuse"][0]["phases"]["blocks_fetched"] == 0
    assert s["warm-node-podman"][0]["phases"]["blocks_fetched"] == 0
    from lazyfs.fs import kernel
    assert s["warm-node"][0]["phases"]["data_path"] == ("fuse" if kernel.unavailable() else "kernel")
    assert s["warm-node-fuse"][0]["phases"]["data_path"] == "fuse"
    assert s["lazy+profile"][0]["phases"]["prefetch"]["fetched"] > 0  # the profile was used
    assert s["lazy+learnt"][0]["phases"]["prefetch"]["planned"] > 0  # the one the fleet learnt
    assert "prefetch" not in s["lazy"][0]["phases"] or not s["lazy"][0]["phases"]["prefetch"]
    summary = results["summary"]["minimal"]
    for mode, row in summary.items():
        median = statistics.median(x["seconds"] for x in s[mode])
        assert row["median_s"] == median
        assert row["x_pull"] == pytest.approx(median / s["pull"][0]["seconds"])
        assert row["x_local"] == pytest.approx(median / s["local"][0]["seconds"])
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 1 + len(w["samples"]) and "| lazy+profile |" in md and md in res.stdout
    assert "| warm-node-fuse | fuse |" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.popen("ip netns list").read().split() if n.startswith("lazyfs-bench")]


def test_summary_ratios_come_from_the_samples():
    def sample(sec, fetched=0, read=0):
        return {"seconds": sec, "mount_s": None, "fetched_bytes": fetched, "requests": 3,
                "read_bytes": read, "phases": {}}
    w = {"samples": {"pull": [sample(10), sample(12), sample(11)],
                     "lazy": [sample(4, 120, 100), sample(5, 125, 100), sample(6, 130, 100)],
                     "local": [sample(2), sample(3), sample(2.5)]}}
    out = report.summarise(w)
    assert out["pull"]["median_s"] == 11 and out["lazy"]["min_s"] == 4 and out["lazy"]["max_s"] == 6
    assert out["lazy"]["x_pull"] == pytest.approx(5 / 11) and out["lazy"]["x_local"] == pytest.approx(2)
    assert out["lazy"]["fetched_over_read"] == pytest.approx(1.25)
    assert "fetched_over_read" not in out["pull"]


def test_a_snapshot_table_compares_with_the_baselines_users_run():
    """The snapshot workloads' table: × cold-init always, × podman-pull when it was measured."""
    def sample(sec):
        return {"seconds": sec, "mount_s": None, "fetched_bytes": 0, "requests": 1,
                "read_bytes": 0, "phases": {}}
    samples = {"cold-init": [sample(2.0)], "lazy-restore+ws": [sample(1.0)], "podman-pull": [sample(8.0)]}
    results = {"date": "d", "machine": {"cpus": 2, "cpu": "c", "kernel": "k"},
               "link": {"rate": "1gbit", "delay_ms": 1.0}, "runs": 1,
               "images": {"torch": {"ref": "bench/torch:latest", "files": 1, "bytes": 1,
                                    "layers": 1, "compressed_bytes": 1}},
               "workloads": {"snapshot-one": {"image": "torch", "argv": ["p"], "samples": samples}}}
    results["summary"] = {"snapshot-one": report.summarise(results["workloads"]["snapshot-one"])}
    md = report.markdown(results)
    assert "| mode | median s | min–max s | × cold-init | × podman-pull | process resumed s |" in md
    assert "| lazy-restore+ws | 1.00 | 1.00–1.00 | 0.50 | 0.12 | – |" in md
    assert BenchConfig(["snapshot-one"], baselines=["podman-pull"]).snapshot_modes()[-1] == "podman-pull"
    assert "podman-pull" not in BenchConfig(["snapshot-one"]).snapshot_modes()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping the page cache needs root")
def test_a_drop_leaves_the_servers_files_in_the_page_cache_and_not_the_nodes(tmp_path, monkeypatch):
    """The node's page cache is dropped before each timed run; the servers' files (other machines
    in a fleet) are read back in while their directories are kept, and dropped once they are not."""
    from bench import pagecache
    from lazyfs.proc.syscalls import cached_pages

    def write(path, n):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(n))
        return path
    server = [write(tmp_path / "server-cache" / "ab" / f"block{i}", 256 * 1024) for i in range(3)]
    node = write(tmp_path / "node-cache" / "block", 256 * 1024)
    if cached_pages(node) is None:
        pytest.skip("this kernel cannot say what is in the page cache (cachestat(2): Linux 6.5)")
    pages = 256 * 1024 // mmap.PAGESIZE
    with pagecache.servers_kept([tmp_path / "server-cache"]):
        pagecache.drop_caches()
        if cached_pages(node):
            pytest.skip(f"{tmp_path} is on a filesystem whose pages a drop keeps (tmpfs?)")
        assert [cached_pages(p) for p in server] == [pages] * 3
    pagecache.drop_caches()  # no longer kept: dropped like the rest
    assert [cached_pages(p) for p in server] == [0, 0, 0]
    # Reading back stops at its limit (a server cache larger than the machine's memory), and
    # the results will say so.
    monkeypatch.setattr(pagecache, "cut_short", False)
    assert pagecache.read_back([tmp_path / "server-cache"], limit=300_000) == 300_000
    assert pagecache.cut_short


def test_link_rates_parse_like_tc():
    assert rate_bits("1gbit") == 1e9 and rate_bits("100mbit") == 1e8 and rate_bits("2.5Gbit") == 2.5e9
    with pytest.raises(LinkError):
        rate_bits("fast")


def test_pull_baseline_extracts_like_umoci(umoci_image, tmp_path):
    """The pull baseline's tar + whiteout extraction gives umoci's tree (the layers include
    whiteouts and an opaque directory), so `pull` runs on the right files."""
    from bench.pull import extract_layer
    from tests.images import snapshot_tree
    layout, oracle = umoci_image
    index = json.loads((layout / "index.json").read_text())
    desc = next(m for m in index["manifests"]
                if m["annotations"]["org.opencontainers.image.ref.name"] == "test")
    manifest = json.loads((layout / "blobs" / "sha256" / desc["digest"][7:]).read_text())
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    for layer in manifest["layers"]:
        extract_layer(layout / "blobs" / "sha256" / layer["digest"][7:], layer["mediaType"], rootfs)
    got, want = snapshot_tree(rootfs), snapshot_tree(oracle)
    assert got["entries"].keys() == want["entries"].keys()
    for path, info in want["entries"].items():
        mine = dict(got["entries"][path])
        if info["fmt"] == 0o040000:  # directory mtimes move when whiteouts delete inside them
            mine.pop("mtime_ns"), info.pop("mtime_ns")
        assert mine == info, path
    assert got["hardlinks"] == want["hardlinks"]


def test_the_local_restore_table_and_its_checks_come_from_the_samples():
    from bench import local_restore as lr

    def line(state, rand):
        return f"served {state} 1.5 4e414d45 {rand}"
    samples = {"cold-start": [{"seconds": 4.0, "line": line("aa", "01")}, {"seconds": 5.0, "line": line("bb", "02")}],
               "restore": [{"seconds": 1.0, "line": line("cc", "03")}, {"seconds": 1.2, "line": line("cc", "04")}],
               "restore-mounted": [{"seconds": 0.7, "line": line("cc", "05")}],
               "criu-floor": [{"seconds": 0.5, "line": ""}, {"seconds": 0.9, "line": ""}]}
    lr._check(samples)
    table = lr.markdown({"runs": 2, "date": "d", "samples": samples})
    assert "| restore | 1.10 | 1.00–1.20 | 0.24 | 1.57 |" in table  # medians 1.1 / 4.5 and / 0.7
    assert "| restore-mounted | 0.70 | 0.70–0.70 | 0.16 | 1.00 |" in table
    samples["restore"][1]["line"] = line("dd", "04")
    with pytest.raises(lr.LocalRestoreError, match="disagree"):
        lr._check(samples)
    samples["restore"][1]["line"] = line("cc", "03")
    with pytest.raises(lr.LocalRestoreError, match="same randomness"):
        lr._check(samples)

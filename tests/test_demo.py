"""The README's first command ends in `lazyfs demo`: it must work and tell the truth."""
from __future__ import annotations

import re

from tests.conftest import BUSYBOX, lazyfs_cli, needs_mount

import pytest


@needs_mount
@pytest.mark.skipif(not BUSYBOX, reason="busybox not installed (apt-get install busybox-static)")
def test_demo_runs_lazily(env_dirs):
    proc = lazyfs_cli("demo", timeout=300)
    out = proc.stdout
    assert "hello from a lazily loaded container" in out
    assert "files in /app/model: 8" in out
    m = re.search(r"fetched ([\d.]+) MiB of the ([\d.]+) MiB image \(([\d.]+)%\) in (\d+) blocks", out)
    assert m, out
    fetched, total, pct, blocks = float(m[1]), float(m[2]), float(m[3]), int(m[4])
    assert abs(pct - 100 * fetched / total) < 0.2
    assert total > 60 and 0 < fetched < total / 5 and blocks > 0
    assert "exit code 0" in out
    # Run again: the image is already in the store, so nothing new is written.
    again = lazyfs_cli("demo", timeout=300)
    assert "exit code 0" in again.stdout

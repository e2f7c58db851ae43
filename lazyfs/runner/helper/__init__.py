"""The snapshot helper every container gets: ``import lazyfs_snapshot`` works in any `lazyfs run`.

``lazyfs_snapshot.ready()`` returns 0 outside a snapshot run, so one program runs unchanged cold,
snapshotted and restored. The module sits in a read-only layer of its own above the image (plain
runs) or in the writable layer (snapshot runs, where CRIU records it), at ``/.lazyfs/python``,
which goes first on the container's PYTHONPATH; the image's own PYTHONPATH follows it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

SOURCE = Path(__file__).with_name("lazyfs_snapshot.py")
MARKER_DIR = ".lazyfs"  # inside the container root: the helper, and a snapshot run's markers
PYTHON_DIR = f"/{MARKER_DIR}/python"


def install(root: Path) -> Path:
    """Put the helper under ``root`` (a layer's top directory, not mounted yet) where
    PYTHON_DIR finds it inside the container."""
    target = root / MARKER_DIR / "python"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(SOURCE, target / SOURCE.name)
    return target / SOURCE.name


def with_python_path(env: list[str]) -> list[str]:
    """``env`` (KEY=VALUE, later ones win) with PYTHON_DIR first on PYTHONPATH (once)."""
    current = ""
    for kv in env:
        if kv.startswith("PYTHONPATH="):
            current = kv.split("=", 1)[1]
    rest = [kv for kv in env if not kv.startswith("PYTHONPATH=")]
    parts = [PYTHON_DIR] + [p for p in current.split(":") if p and p != PYTHON_DIR]
    return rest + ["PYTHONPATH=" + ":".join(parts)]

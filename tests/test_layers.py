"""The layering of docs/architecture.md, as import-linter contracts in pyproject.toml: the tree as
it is keeps them, and an upward import planted in a copy of it breaks them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lazyfs", "imagebuilder", "cache_server", "snapshot", "bench")
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(tree: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([str(LINT), str(tree / "pyproject.toml"), "--no-cache"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_its_layers():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    planted = tmp_path / "lazyfs" / "store" / "local.py"
    planted.write_text(planted.read_text() + "\nfrom lazyfs.node import client  # planted\n")
    pure = tmp_path / "lazyfs" / "format" / "digest.py"
    pure.write_text(pure.read_text() + "\nimport cache_server.app  # planted\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "lazyfs.store.local -> lazyfs.node.client" in res.stdout, res.stdout
    assert "lazyfs.format.digest -> cache_server.app" in res.stdout, res.stdout
    assert "0 broken" not in res.stdout and "layered" in res.stdout and "format is pure" in res.stdout

"""Shared fixtures. Stores under test are listed in STORE_FACTORIES (the conformance suite runs each)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lazyfs.store.local import LocalStore

ROOT = Path(__file__).resolve().parent.parent
LAZYFS = [sys.executable, "-m", "lazyfs.cli"]


def _local_store(tmp_path: Path):
    return LocalStore(tmp_path / "store")


STORE_FACTORIES = {"local": _local_store}


@pytest.fixture(params=sorted(STORE_FACTORIES))
def any_store(request, tmp_path):
    store = STORE_FACTORIES[request.param](tmp_path)
    yield store
    store.close()


def mount_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "FUSE mount tests need root (they mount with allow_other and overlayfs)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not shutil.which("fusermount") and not shutil.which("fusermount3"):
        return "fusermount not installed (apt-get install fuse3)"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError, EnvironmentError) as exc:
        return f"fusepy cannot load libfuse ({exc}); apt-get install libfuse2"
    return None


needs_mount = pytest.mark.skipif(mount_skip_reason() is not None, reason=str(mount_skip_reason()))


def lazyfs_cli(*args, env=None, check=True, timeout=120, input=None):
    """Run the real CLI in a subprocess, the way a user does."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([*LAZYFS, *map(str, args)], capture_output=True, text=True, env=full_env,
                          timeout=timeout, input=input, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"lazyfs {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc

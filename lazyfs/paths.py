"""Default locations: the embedded store, the node cache, mount state and logs."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import platformdirs

from lazyfs import environ

APP = "lazyfs"


def default_store() -> str:
    return os.environ.get("LAZYFS_STORE") or str(Path(platformdirs.user_data_dir(APP)) / "store")


def default_cache_dir() -> Path:
    return Path(os.environ.get("LAZYFS_CACHE_DIR") or Path(platformdirs.user_cache_dir(APP)) / "node-cache")


def state_dir() -> Path:
    return Path(os.environ.get("LAZYFS_STATE_DIR") or platformdirs.user_state_dir(APP))


def node_dir() -> Path:
    """The node agent's state: its shared mounts, their leases, its log."""
    return state_dir() / "node"


def node_socket() -> Path:
    """The node agent's socket: ``$LAZYFS_NODE_SOCKET``, else beside its state."""
    return Path(environ.node_socket() or node_dir() / "node.sock")


def mount_key(mountpoint: str) -> str:
    """The name a mountpoint goes by in state files and control sockets: a hash of its real
    path (paths can be long and hold any byte)."""
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:24]


def default_token() -> str | None:
    """Bearer token for cache servers: $LAZYFS_TOKEN, or the first line of $LAZYFS_TOKEN_FILE."""
    if os.environ.get("LAZYFS_TOKEN"):
        return os.environ["LAZYFS_TOKEN"].strip()
    if os.environ.get("LAZYFS_TOKEN_FILE"):
        return Path(os.environ["LAZYFS_TOKEN_FILE"]).read_text().strip()
    return None

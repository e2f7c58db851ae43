"""The node agent's environment variables, each read here and nowhere else. The run fast path
(lazyfs.node.fastrun) imports this before anything else, so it imports nothing but os."""
from __future__ import annotations

import os

NODE = "LAZYFS_NODE"  # auto: runs and mounts go through the node agent (started on demand); off: not
NODE_SOCKET = "LAZYFS_NODE_SOCKET"  # the agent's socket, instead of the one beside its state
NODE_MODES = ("auto", "off")


def node_mode() -> str:
    return os.environ.get(NODE, "auto")


def node_socket() -> str | None:
    return os.environ.get(NODE_SOCKET) or None

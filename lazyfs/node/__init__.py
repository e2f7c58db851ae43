"""The node agent (`lazyfs node`): one resident process per node that keeps one shared mount per
image (reference-counted by its users, unmounted after an idle grace period), the decoded image
configs and the open stores, and the node cache's cap. `lazyfs run` and `lazyfs mount` are its
clients. docs/node.md describes it.
"""

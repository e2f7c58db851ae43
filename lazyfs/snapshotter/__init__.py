"""The containerd snapshotter: `lazyfs snapshotter`, a proxy plugin that gives containerd (and
so Kubernetes) lazy images. docs/containerd.md says how to use it; the parts:

- ``meta``: the snapshots containerd asked for, in a SQLite file (durable across restarts);
- ``overlay``: which mounts a snapshot is (pure: from its ancestry to containerd's Mount list);
- ``images``: what lazyfs has (a chain ID's image in the store) and the node agent's leases;
- ``snapshots``: containerd's snapshot semantics over those three (no gRPC);
- ``proto`` and ``service``: the gRPC stubs (generated from the installed .proto files) and the
  adapter, the one place lazyfs errors become gRPC status codes.
"""

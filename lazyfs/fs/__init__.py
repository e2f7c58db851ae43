"""The mounted image, along the data path: index (metadata from the manifest) → cache (the node
cache, fed by a BlockSource) → fuseops (the FUSE adapter, the only place errors become errno) →
daemon (the process serving one mount) → mounts (the caller's side: start, wait, unmount)."""

"""Process snapshots: CRIU dump and restore of a warmed process on a lazyfs image, with GPU
state through libcuda's checkpoint API (docs/snapshots.md)."""

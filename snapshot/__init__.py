"""Process snapshots (CRIU, libcuda checkpoint): arrives with the snapshot issue."""

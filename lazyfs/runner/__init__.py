"""`lazyfs run`: image mount → overlayfs writable layer → container runtime."""

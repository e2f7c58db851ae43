"""lazyfs: lazily loaded container images (see docs/architecture.md)."""

__version__ = "0.1.0"

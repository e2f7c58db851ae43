from lazyfs.cli import app  # noqa: F401

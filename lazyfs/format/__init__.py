"""Pure codecs for the lazyfs on-store format (docs/format.md). Nothing in this package does I/O."""

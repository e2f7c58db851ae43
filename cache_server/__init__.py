"""The cache server tier (`lazyfs serve`): arrives with the cache-server issue."""

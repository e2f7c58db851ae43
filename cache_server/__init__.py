"""The cache server tier (`lazyfs serve`): an aiohttp server in front of an origin store that keeps
hot blocks on local disk and serves nodes single and batch block reads (docs/protocol.md)."""

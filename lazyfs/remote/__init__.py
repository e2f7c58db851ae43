"""Fetching from a fleet of cache servers: rendezvous sharding, failover, hedging, deadlines."""

"""Benchmarks and measurements (run on demand, never part of the default test run)."""

"""Benchmarks: figures (and, later, spec loading, the runner, tables and comparisons)."""

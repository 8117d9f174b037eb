"""Benchmarks: spec loading, the method-agnostic runner, the results store, the paper's tables and regression comparisons."""

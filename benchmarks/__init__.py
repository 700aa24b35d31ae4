"""Benchmark and measurement harness: outside the package, run from the checkout (`python -m benchmarks.bench`)."""

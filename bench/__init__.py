"""Benchmark suites (pytest-benchmark), the one-call GPU script and the plot. A package so that its test
modules (``bench.test_*``) never clash with same-named modules under tests/."""

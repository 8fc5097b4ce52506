"""Benchmarks: each script prints ratios against a reference measured in the same run (README.md).

A regular package, so `from benchmarks.coordinator import ...` finds these files and not the
unrelated top-level `benchmarks` package that Opacus installs.
"""

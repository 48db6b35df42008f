"""Benchmarks for tokenbridge (not part of the test suite): ``python -m bench``."""

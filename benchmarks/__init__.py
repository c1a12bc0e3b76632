"""Benchmarks: they print measured figures; they are not tests and assert nothing."""

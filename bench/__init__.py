"""Benchmarks: each figure printed beside the ceiling it is measured against (`make bench`)."""

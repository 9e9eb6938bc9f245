"""Benchmarks of mirror against skopeo (and curl): `python -m bench`, writes docs/BENCHMARKS.md."""

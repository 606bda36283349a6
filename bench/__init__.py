"""Benchmarks of CellCMS Privacy Ops against the local stack (`python bench/retention.py --help`)."""

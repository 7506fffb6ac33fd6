"""Benchmarks: ``python -m jfb_ip.bench.<name>``."""

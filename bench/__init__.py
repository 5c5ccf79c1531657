"""Encapsulation benchmarks on the namespace lab (``python -m bench.run``)."""

"""Benchmarks of waveft-train: speed and memory, run as `python -m benchmarks.<name>` from the repository root."""

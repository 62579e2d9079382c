"""Benchmarks of django-celery-worker-health (not part of the wheel, not tests).

Each module is one benchmark with one command, e.g. ``python -m bench.throughput``; see
docs/benchmarks.md for the commands and the latest results.
"""

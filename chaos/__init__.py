"""The chaos suite: real workers, beat and faults, with worker_health and with Celery alone.

    python -m chaos.run --short     # CI: worker_health only, a few minutes
    python -m chaos.run --full      # every scenario, side by side with plain Celery

See docs/reliability.md for the scenarios and the latest results.
"""

"""Settings of the chaos suite's processes: the benchmark settings (``BENCH_VARIANT``:
``worker_health`` or ``plain``), with an alert notifier so quarantines can be counted."""

from __future__ import annotations

from bench.settings import *  # noqa: F403

WORKER_HEALTH_NOTIFIERS = ["worker_health.notifiers.LoggingNotifier"]
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"worker_health": {"handlers": ["console"], "level": "INFO"}},
}

"""Settings for the benchmarks: the example project, with the apps of one *variant*.

BENCH_VARIANT (environment):
  plain          Celery + Django, no worker_health, no result backend
  events         plain, and the worker runs with -E (task events, what Flower needs)
  results        plain + django-celery-results' database backend (``django-db``)
  worker_health  plain + worker_health tracking every task
  all            every app installed (to migrate the benchmark database)

DATABASE_URL, CELERY_BROKER_URL, EXAMPLE_QUEUE and WORKER_HEALTH_* are read as in
``example_project.settings``.
"""

from __future__ import annotations

import os

from example_project.settings import *  # noqa: F403
from example_project.settings import INSTALLED_APPS as _EXAMPLE_APPS

VARIANTS = ("plain", "events", "results", "worker_health", "all")
BENCH_VARIANT = os.environ.get("BENCH_VARIANT", "all")
if BENCH_VARIANT not in VARIANTS:
    raise RuntimeError(f"BENCH_VARIANT must be one of {VARIANTS}, got {BENCH_VARIANT!r}")

_optional = {
    "django_celery_results": BENCH_VARIANT in ("results", "all"),
    "worker_health": BENCH_VARIANT in ("worker_health", "all"),
    "django_celery_beat": BENCH_VARIANT == "all",
}
INSTALLED_APPS = [app for app in _EXAMPLE_APPS if _optional.get(app, True)]

# Celery's defaults, not the example project's: no result unless the variant stores one,
# no STARTED state (one write per task fewer for django-celery-results).
CELERY_RESULT_BACKEND: str | None = "django-db" if BENCH_VARIANT == "results" else None  # type: ignore[no-redef]
CELERY_TASK_TRACK_STARTED = False
CELERY_RESULT_EXTENDED = False
CELERY_WORKER_SEND_TASK_EVENTS = BENCH_VARIANT == "events"
DEBUG = False

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"worker_health": {"handlers": ["console"], "level": "WARNING"}},
}

ROOT_URLCONF = "bench.urls"

# Django's default is 0: a new connection for every request, and (through Celery's Django
# fix-up, which closes connections around every task) for every task that uses the ORM.
if os.environ.get("BENCH_CONN_MAX_AGE"):
    DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ["BENCH_CONN_MAX_AGE"])  # noqa: F405

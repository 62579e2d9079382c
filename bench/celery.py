"""The benchmark's Celery app: the example project's app, with :mod:`bench.probe` connected.

celery -A bench.celery worker ...   (DJANGO_SETTINGS_MODULE=bench.settings)
"""

from __future__ import annotations

from example_project.celery import app

from . import probe

probe.connect()

__all__ = ("app",)

"""The chaos suite's Celery app: the example project's app, with :mod:`chaos.tasks`.

celery -A chaos.celery worker ...   (DJANGO_SETTINGS_MODULE=chaos.settings)
"""

from __future__ import annotations

from example_project.celery import app

from . import tasks  # noqa: F401 - registers the chaos tasks

__all__ = ("app",)

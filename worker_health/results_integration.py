"""django-celery-results integration, active only when that app is installed."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from django.apps import apps

logger = logging.getLogger("worker_health")


def installed() -> bool:
    return apps.is_installed("django_celery_results")


def reset_started(task_ids: Iterable[str]) -> int:
    """Reclaimed tasks are waiting to run again: they must not stay ``STARTED``."""
    ids = list(task_ids)
    if not ids or not installed():
        return 0
    from django_celery_results.models import TaskResult

    return TaskResult.objects.filter(task_id__in=ids, status="STARTED").update(status="PENDING")


class TaskQuarantined(Exception):
    """Stored as the result of a task that kept killing its worker."""


def mark_quarantined(task_id: str, message: str) -> None:
    """Store ``FAILURE`` with ``message`` in the result backend (django-celery-results or
    whatever backend the Celery app uses)."""
    from celery import current_app

    try:
        app = current_app
        if app.conf.result_backend or installed():
            app.backend.mark_as_failure(task_id, TaskQuarantined(message))
    except Exception:
        logger.exception("worker_health: could not store the quarantine of %s", task_id)

"""The periodic tasks celery beat runs. Thin: they call :mod:`.reclaim` and the querysets."""

from __future__ import annotations

import socket
from typing import Any

from celery import shared_task

from . import reclaim
from .conf import settings
from .models import TaskQueue, WorkerEvent

DETECT_TASK = "worker_health.tasks.detect_failed_workers"
PRUNE_TASK = "worker_health.tasks.prune_finished_tasks"


@shared_task(name=DETECT_TASK, ignore_result=True)
def detect_failed_workers(force: bool = False) -> list[str]:
    """Fail stale workers and reclaim their tasks. Returns the ids of workers it failed."""
    result = reclaim.sweep(who=f"beat@{socket.gethostname()}", force=force)
    return result.failed_workers


@shared_task(name=PRUNE_TASK, ignore_result=True)
def prune_finished_tasks() -> dict[str, Any]:
    """Delete finished task rows and events older than ``WORKER_HEALTH_RETENTION``."""
    retention = settings.RETENTION
    return {
        "tasks": TaskQueue.objects.delete_finished(retention),
        "events": WorkerEvent.objects.delete_older_than(retention),
    }

"""Taking a worker out of service: the one place a worker is marked offline.

A worker marks itself offline on warm shutdown. An operator (admin action) can mark a live
worker offline to *drain* it: the worker sees the mark at its next heartbeat and shuts
down warmly by itself (finishing what it runs, handing back what it only holds), with no
broadcast over the broker. While it drains it keeps heartbeating, so what it runs is not
reclaimed; if it dies while draining, its heartbeat goes stale and its tasks are reclaimed.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from .models import EventKind, WorkerRegistry, event
from .signals import worker_offline

logger = logging.getLogger("worker_health")


def mark_offline(worker_id: str, incarnation: uuid.UUID | None = None, **details: Any) -> bool:
    """Mark ``worker_id`` offline (only that incarnation, if given). True if it changed."""
    if not WorkerRegistry.objects.mark_offline(worker_id, incarnation):
        return False
    worker = WorkerRegistry.objects.get(worker_id=worker_id)
    event(EventKind.WORKER_OFFLINE, worker=worker, **details)
    logger.info("worker_offline: %s", worker_id, extra={"worker_id": worker_id, **details})
    worker_offline.send_robust(sender=WorkerRegistry, worker=worker)
    return True

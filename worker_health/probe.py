"""A liveness probe that reads the registry instead of broadcasting over the broker."""

from __future__ import annotations

from django.db.models import Q

from .conf import settings
from .models import WorkerRegistry
from .querysets import db_now_minus


def probe(worker_id: str | None, host: str) -> tuple[bool, str]:
    """(ok, one-line reason) for ``worker_id``, or for the workers on ``host``."""
    qs = WorkerRegistry.objects.all()
    if worker_id:
        qs = qs.filter(worker_id=worker_id)
    else:
        qs = qs.filter(Q(metadata__host=host) | Q(worker_id__endswith=f"@{host}"))
    fresh = qs.filter(status="active", last_heartbeat__gte=db_now_minus(settings.STALE_AFTER))
    name = fresh.values_list("worker_id", flat=True).first()
    if name:
        return True, f"ok: {name} has a fresh heartbeat"
    row = qs.values("worker_id", "status", "last_heartbeat").first()
    target = worker_id or f"any worker on {host}"
    if row is None:
        return False, f"unhealthy: {target} is not registered"
    return False, (
        f"unhealthy: {row['worker_id']} is {row['status']}, last heartbeat {row['last_heartbeat']}"
    )

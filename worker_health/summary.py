"""The health summary: the JSON of ``manage.py worker_health status`` and the endpoint."""

from __future__ import annotations

from typing import Any

from django.db.models import Count
from django.db.models.functions import Now

from .conf import settings
from .models import DetectorState, TaskQueue, WorkerRegistry


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    text = value.isoformat()
    return text.replace("+00:00", "Z")


def health_summary(include_workers: bool = True, include_tasks: bool = True) -> dict[str, Any]:
    """Counts by status and one entry per worker, judged by the database's clock."""
    by_status = dict(
        WorkerRegistry.objects.order_by().values_list("status").annotate(n=Count("pk"))
    )
    summary: dict[str, Any] = {
        "active_workers": by_status.get("active", 0),
        "failed_workers": by_status.get("failed", 0),
        "offline_workers": by_status.get("offline", 0),
        "settings": {
            "heartbeat_interval": settings.HEARTBEAT_INTERVAL,
            "stale_after": settings.STALE_AFTER,
            "check_interval": settings.CHECK_INTERVAL,
        },
    }
    if include_tasks:
        # Only the statuses that are small by nature are counted here: held and
        # quarantined tasks. Finished rows (the big ones) are not counted on every call.
        held = dict(
            TaskQueue.objects.filter(
                status__in=("reserved", "claimed", "reclaiming", "quarantined")
            )
            .order_by()
            .values_list("status")
            .annotate(n=Count("pk"))
        )
        summary["tasks"] = {
            s: held.get(s, 0) for s in ("reserved", "claimed", "reclaiming", "quarantined")
        }
    detector = (
        DetectorState.objects.filter(pk=1)
        .values("last_sweep_at", "last_success_at", "last_sweep_by", "last_sweep_duration")
        .first()
    )
    summary["detector"] = {
        "last_sweep_at": _iso(detector["last_sweep_at"]) if detector else None,
        "last_sweep_by": detector["last_sweep_by"] if detector else None,
        "last_sweep_duration": detector["last_sweep_duration"] if detector else None,
    }
    if include_workers:
        rows = WorkerRegistry.objects.annotate(db_now=Now()).values(
            "worker_id",
            "status",
            "last_heartbeat",
            "tasks_processed",
            "started_at",
            "db_now",
            "metadata",
        )
        workers = []
        for row in rows:
            age = (
                (row["db_now"] - row["last_heartbeat"]).total_seconds()
                if row["last_heartbeat"] and row["db_now"]
                else None
            )
            meta = row["metadata"] or {}
            workers.append(
                {
                    "id": row["worker_id"],
                    "status": row["status"],
                    "last_heartbeat": _iso(row["last_heartbeat"]),
                    "heartbeat_age": round(age, 3) if age is not None else None,
                    "tasks_processed": row["tasks_processed"],
                    "started_at": _iso(row["started_at"]),
                    "host": meta.get("host"),
                    "pid": meta.get("pid"),
                    "pool": meta.get("pool"),
                    "concurrency": meta.get("concurrency"),
                }
            )
        summary["workers"] = workers
    return summary

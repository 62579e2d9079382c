"""Health numbers read from the database when asked: the admin overview's counts and charts,
the readiness endpoint, and the Prometheus collector (extra ``[prometheus]``).

Every age is measured with the database's clock. Nothing here counts the whole task table:
the statuses a task passes through briefly (held, reclaiming, quarantined) are counted
exactly; the ones that grow without bound (queued, finished) are counted up to a cap.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from django.db.models import Count, Max, Q
from django.db.models.functions import Coalesce, Now, TruncHour

from .conf import settings
from .models import DetectorState, EventKind, TaskQueue, WorkerEvent, WorkerRegistry
from .querysets import db_now_minus

if TYPE_CHECKING:
    from prometheus_client.registry import Collector, CollectorRegistry

#: task statuses counted exactly: small by nature, and covered by partial / status indexes
EXACT_TASK_STATUSES = ("reserved", "claimed", "reclaiming", "quarantined")
#: task statuses whose rows pile up: counted up to ``COUNT_CAP``
CAPPED_TASK_STATUSES = ("queued", "succeeded", "failed", "revoked")
COUNT_CAP = 10_000
#: the event kinds (``EventKind`` values) charted on the overview
CHART_KINDS = ("worker_failed", "task_reclaimed", "task_quarantined")


def database_now() -> datetime:
    """The database server's current time (one query that reads no rows)."""
    # MAX over no rows is NULL, so COALESCE answers NOW() without touching a table row.
    now = DetectorState.objects.filter(pk=0).aggregate(now=Coalesce(Max(Now()), Now()))["now"]
    assert now is not None
    return now


def worker_counts() -> dict[str, int]:
    """Workers by displayed status: ``active`` (fresh), ``late``, ``failed``, ``offline``.

    ``late`` is an active worker whose heartbeat is older than one ``HEARTBEAT_INTERVAL``
    (whether or not the detector has yet found it stale).
    """
    late = Q(status="active") & (
        Q(last_heartbeat__isnull=True)
        | Q(last_heartbeat__lt=db_now_minus(settings.HEARTBEAT_INTERVAL))
    )
    return WorkerRegistry.objects.aggregate(
        active=Count("pk", filter=Q(status="active") & ~late),
        late=Count("pk", filter=late),
        failed=Count("pk", filter=Q(status="failed")),
        offline=Count("pk", filter=Q(status="offline")),
    )


def live_worker_count() -> int:
    """Active workers whose heartbeat is younger than ``STALE_AFTER``."""
    return WorkerRegistry.objects.filter(
        status="active", last_heartbeat__gte=db_now_minus(settings.STALE_AFTER)
    ).count()


@dataclass(frozen=True)
class TaskCount:
    status: str
    count: int
    #: False when the count stopped at the cap: there are at least ``count`` rows
    exact: bool

    def __str__(self) -> str:
        return f"{self.count:,}" if self.exact else f"{self.count:,}+"


def exact_task_counts() -> dict[str, int]:
    counts = dict(
        TaskQueue.objects.filter(status__in=EXACT_TASK_STATUSES)
        .order_by()
        .values_list("status")
        .annotate(n=Count("pk"))
    )
    return {status: counts.get(status, 0) for status in EXACT_TASK_STATUSES}


def task_counts(cap: int | None = None) -> list[TaskCount]:
    """Tasks by status: exact for the transient statuses, capped (default ``COUNT_CAP``)
    for the others."""
    cap = COUNT_CAP if cap is None else cap
    result = [TaskCount(s, n, True) for s, n in exact_task_counts().items()]
    for status in CAPPED_TASK_STATUSES:
        # COUNT over a LIMITed subquery: reads at most cap + 1 index entries.
        n = TaskQueue.objects.filter(status=status).order_by()[: cap + 1].count()
        result.append(TaskCount(status, min(n, cap), n <= cap))
    return result


@dataclass(frozen=True)
class HourlySeries:
    kind: str
    label: str
    #: oldest hour first; ``hours[i]`` starts at ``start + i hours``
    counts: list[int]
    start: datetime

    @property
    def total(self) -> int:
        return sum(self.counts)


def events_per_hour(
    kinds: Iterable[str] = CHART_KINDS, hours: int = 24, now: datetime | None = None
) -> list[HourlySeries]:
    """Events of each kind per hour over the last ``hours`` hours (the current hour last)."""
    now = now or database_now()
    start = now.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(
        hours=hours - 1
    )
    kinds = list(kinds)
    rows = (
        WorkerEvent.objects.filter(kind__in=kinds, created_at__gte=start)
        .annotate(hour=TruncHour("created_at", tzinfo=timezone.utc))
        .order_by()
        .values_list("kind", "hour")
        .annotate(n=Count("pk"))
    )
    counts = {kind: [0] * hours for kind in kinds}
    for kind, hour, n in rows:
        index = int((hour - start).total_seconds() // 3600)
        if 0 <= index < hours:
            counts[kind][index] += n
    labels = dict(EventKind.choices)
    return [HourlySeries(k, str(labels.get(k, k)), counts[k], start) for k in kinds]


def event_totals(kinds: Iterable[str]) -> dict[str, int]:
    """Events of each kind still in the log (the log is pruned after ``RETENTION``)."""
    kinds = list(kinds)
    counts = dict(
        WorkerEvent.objects.filter(kind__in=kinds)
        .order_by()
        .values_list("kind")
        .annotate(n=Count("pk"))
    )
    return {kind: counts.get(kind, 0) for kind in kinds}


# --------------------------------------------------------------------------------------------
# Prometheus


class WorkerHealthCollector:
    """A Prometheus collector that reads the database on each scrape (about six queries)."""

    def describe(self) -> list[Any]:
        # Declared empty so registering does not query the database.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        workers = GaugeMetricFamily(
            "worker_health_workers",
            "Celery workers by status (active: fresh heartbeat; late: older than one "
            "heartbeat interval).",
            labels=["status"],
        )
        for status, n in worker_counts().items():
            workers.add_metric([status], n)
        yield workers

        ages = GaugeMetricFamily(
            "worker_health_worker_heartbeat_age_seconds",
            "Seconds since the last heartbeat of each active worker, by the database's clock.",
            labels=["worker"],
        )
        rows = (
            WorkerRegistry.objects.filter(status="active", last_heartbeat__isnull=False)
            .annotate(db_now=Now())
            .values_list("worker_id", "last_heartbeat", "db_now")
        )
        for worker_id, last_heartbeat, db_now in rows:
            if db_now is not None and last_heartbeat is not None:
                age = (db_now - last_heartbeat).total_seconds()
                ages.add_metric([worker_id], max(0.0, age))
        yield ages
        yield GaugeMetricFamily(
            "worker_health_stale_after_seconds",
            "Heartbeat age after which the detector declares a worker failed.",
            value=settings.STALE_AFTER,
        )

        tasks = GaugeMetricFamily(
            "worker_health_tasks",
            "Tracked tasks held by a worker, being reclaimed, or quarantined.",
            labels=["status"],
        )
        for status, n in exact_task_counts().items():
            tasks.add_metric([status], n)
        yield tasks

        counters = (
            ("worker_failed", "worker_health_worker_failures", "Workers declared failed."),
            ("task_reclaimed", "worker_health_tasks_reclaimed", "Tasks reclaimed."),
            ("task_quarantined", "worker_health_tasks_quarantined", "Tasks quarantined."),
            (
                "stale_completion",
                "worker_health_stale_completions",
                "Late completions of reclaimed tasks that were fenced off.",
            ),
        )
        totals = event_totals(kind for kind, _, _ in counters)
        for kind, name, doc in counters:
            yield CounterMetricFamily(
                name,
                doc + " Counted from the event log, which is pruned after RETENTION.",
                value=totals[kind],
            )

        detector: dict[str, Any] = dict(
            DetectorState.objects.filter(pk=1)
            .values("last_sweep_at", "last_sweep_duration", "last_success_at")
            .first()
            or {}
        )
        for field, name, doc in (
            (
                "last_sweep_duration",
                "worker_health_detector_last_sweep_duration_seconds",
                "Duration of the last completed detector sweep.",
            ),
            (
                "last_success_at",
                "worker_health_detector_last_success_timestamp_seconds",
                "Unix time at which the last detector sweep completed.",
            ),
            (
                "last_sweep_at",
                "worker_health_detector_last_sweep_timestamp_seconds",
                "Unix time at which the last detector sweep started.",
            ),
        ):
            value = detector.get(field)
            if value is None:
                continue
            if isinstance(value, datetime):
                value = value.timestamp()
            yield GaugeMetricFamily(name, doc, value=float(value))


def register(registry: CollectorRegistry | None = None) -> Collector:
    """Add the collector to ``registry`` (default: prometheus-client's global one), for
    projects that already expose a ``/metrics`` view of their own."""
    from prometheus_client import REGISTRY

    collector = WorkerHealthCollector()
    (registry or REGISTRY).register(collector)
    return collector

"""The package's tables: workers, tracked tasks, the event log and the detector's state."""

from __future__ import annotations

from typing import Any

from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from .querysets import DetectorStateManager, EventQuerySet, TaskQuerySet, WorkerQuerySet


class WorkerStatus(models.TextChoices):
    ACTIVE = "active", _("active")
    OFFLINE = "offline", _("offline")
    FAILED = "failed", _("failed")


class TaskStatus(models.TextChoices):
    QUEUED = "queued", _("queued")
    #: received by a worker and waiting there (for its ETA or a rate limit)
    RESERVED = "reserved", _("reserved")
    #: the worker named by ``claimed_by`` is running it, or has it next in its pool's queue
    CLAIMED = "claimed", _("claimed")
    #: taken from a dead worker; the re-publish is in flight (an outbox state)
    RECLAIMING = "reclaiming", _("reclaiming")
    SUCCEEDED = "succeeded", _("succeeded")
    FAILED = "failed", _("failed")
    REVOKED = "revoked", _("revoked")
    QUARANTINED = "quarantined", _("quarantined")


#: statuses in which a worker holds the task
HELD_STATUSES = (TaskStatus.RESERVED, TaskStatus.CLAIMED)


class WorkerRegistry(models.Model):
    """One row per Celery worker node name."""

    worker_id = models.CharField(_("worker"), max_length=255, unique=True)
    status = models.CharField(
        max_length=16, choices=WorkerStatus.choices, default=WorkerStatus.ACTIVE
    )
    #: unique to one start of the worker process: a restart under the same node name
    #: gets a new one, so the previous incarnation's claims can be told apart.
    incarnation = models.UUIDField()
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    tasks_processed = models.PositiveBigIntegerField(default=0)
    started_at = models.DateTimeField()
    status_changed_at = models.DateTimeField(null=True, blank=True)
    #: worker clock minus database clock, in seconds, measured at registration
    clock_skew = models.FloatField(null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)

    objects = WorkerQuerySet.as_manager()

    class Meta:
        db_table = "worker_registry"
        verbose_name = _("worker")
        verbose_name_plural = _("workers")
        ordering = ("worker_id",)
        indexes = [
            # the detector's query: active workers by heartbeat age
            models.Index(
                fields=["last_heartbeat"],
                name="wh_worker_active_hb_idx",
                condition=Q(status="active"),
            ),
            models.Index(fields=["status", "status_changed_at"], name="wh_worker_status_idx"),
            # the detector's fast path: workers that stopped draining (heartbeats of active
            # workers never touch it: the condition leaves their rows out)
            models.Index(
                fields=["last_heartbeat"],
                name="wh_worker_offline_hb_idx",
                condition=Q(status="offline"),
            ),
        ]
        # the admin's actions, each behind its own permission
        permissions = [
            ("reclaim_worker_tasks", "Can reclaim a worker's tasks now"),
            ("drain_worker", "Can mark a worker offline (drain)"),
            ("delete_old_workers", "Can delete offline/failed workers older than N days"),
        ]

    def __str__(self) -> str:
        return self.worker_id


class TaskQueue(models.Model):
    """One row per tracked task, with what is needed to publish its message again."""

    #: unique through ``wh_task_id_uniq`` (a constraint, not ``unique=True``: on PostgreSQL
    #: that would add a second, ``LIKE`` index that every write pays for and nothing uses)
    task_id = models.CharField(max_length=255)
    task_name = models.CharField(max_length=255)
    status = models.CharField(max_length=16, choices=TaskStatus.choices, default=TaskStatus.QUEUED)
    queue = models.CharField(max_length=255, blank=True, default="")
    claimed_by = models.ForeignKey(
        WorkerRegistry,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="claims",
        db_index=False,  # covered by the partial index below
        # No database constraint: its check on deleting a worker scans the whole table
        # (no index covers claimed_by outside the held statuses, and one would cost every
        # claim and finish a write). Django's SET_NULL still clears the references, in one
        # UPDATE per deletion; nothing else deletes workers.
        db_constraint=False,
    )
    #: incarnation of ``claimed_by`` that holds the task
    claimed_incarnation = models.UUIDField(null=True, blank=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    #: increases with every claim; completions are accepted only with the current token
    fencing_token = models.PositiveIntegerField(default=0)
    reclaim_count = models.PositiveIntegerField(default=0)
    #: the token of the latest run whose start was written before its code ran (every run
    #: but a task's first: see ``reclaim``, which counts a reclaim against ``MAX_RECLAIMS``
    #: only if the run had started, or may have)
    started_token = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text=_(
            "The fencing token of the latest run that recorded its start (every run but a "
            "task's first does). A reclaim counts against MAX_RECLAIMS only if the run had "
            "started, or was the task's first."
        ),
    )
    #: the sweep that moved the task to ``reclaiming`` and owns its re-publish
    reclaim_lease = models.UUIDField(null=True, blank=True)
    reclaimed_at = models.DateTimeField(null=True, blank=True)
    #: publishes of the current reclaim; a reclaimed message that no live worker picked up
    #: (e.g. RabbitMQ pushed it to a paused worker's prefetch) is published again, backing off.
    #: 0 again once a worker receives the task: a later retry is not a lost publish.
    publish_attempts = models.PositiveSmallIntegerField(default=0)
    #: workers that died holding this task, oldest first (for the quarantine message)
    lost_on = models.JSONField(default=list, blank=True)

    # The message as it was delivered, so it can be published again byte for byte.
    exchange = models.CharField(max_length=255, blank=True, default="")
    routing_key = models.CharField(max_length=255, blank=True, default="")
    body = models.BinaryField(null=True, blank=True)
    content_type = models.CharField(max_length=128, blank=True, default="")
    content_encoding = models.CharField(max_length=64, blank=True, default="")
    headers = models.JSONField(null=True, blank=True)
    properties = models.JSONField(null=True, blank=True)
    eta = models.DateTimeField(null=True, blank=True)
    expires = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = TaskQuerySet.as_manager()

    class Meta:
        db_table = "task_queue"
        verbose_name = _("tracked task")
        verbose_name_plural = _("tracked tasks")
        indexes = [
            # reclamation: the tasks a given worker holds
            models.Index(
                fields=["claimed_by", "status"],
                name="wh_task_held_idx",
                condition=Q(status__in=["reserved", "claimed"]),
            ),
            # the outbox: re-publishes that did not complete
            models.Index(
                fields=["reclaimed_at"],
                name="wh_task_reclaiming_idx",
                condition=Q(status="reclaiming"),
            ),
            # the outbox: reclaims published that no live worker received (no row of the hot
            # path is ever in it: a claim sets publish_attempts to 0)
            models.Index(
                fields=["reclaimed_at"],
                name="wh_task_unpicked_idx",
                condition=Q(status="queued", publish_attempts__gt=0),
            ),
            # retention: finished rows by age; and counts by status
            models.Index(fields=["status", "finished_at"], name="wh_task_finished_idx"),
            # the admin's task name filter
            models.Index(fields=["task_name"], name="wh_task_name_idx"),
        ]
        constraints = [models.UniqueConstraint(fields=["task_id"], name="wh_task_id_uniq")]
        permissions = [
            # task arguments may hold personal data: shown only with this permission
            ("view_task_arguments", "Can view task arguments"),
            ("requeue_quarantined", "Can requeue quarantined tasks"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}]"


class EventKind(models.TextChoices):
    WORKER_REGISTERED = "worker_registered", _("worker registered")
    WORKER_FAILED = "worker_failed", _("worker failed")
    WORKER_RECOVERED = "worker_recovered", _("worker recovered")
    WORKER_OFFLINE = "worker_offline", _("worker offline")
    WORKER_RESTARTED = "worker_restarted", _("worker restarted under the same name")
    TASK_RECLAIMED = "task_reclaimed", _("task reclaimed")
    TASK_QUARANTINED = "task_quarantined", _("task quarantined")
    TASK_REQUEUED = "task_requeued", _("quarantined task requeued")
    STALE_COMPLETION = "stale_completion", _("stale completion fenced")
    DUPLICATE_DELIVERY = "duplicate_delivery", _("duplicate delivery skipped")
    ALERT_SENT = "alert_sent", _("alert sent")


class WorkerEvent(models.Model):
    """Audit log of everything the package decides."""

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    kind = models.CharField(max_length=32, choices=EventKind.choices)
    worker = models.ForeignKey(
        WorkerRegistry, null=True, blank=True, on_delete=models.SET_NULL, related_name="events"
    )
    worker_name = models.CharField(max_length=255, blank=True, default="")
    task_id = models.CharField(max_length=255, blank=True, default="")
    details = models.JSONField(default=dict, blank=True)

    objects = EventQuerySet.as_manager()

    class Meta:
        db_table = "worker_health_event"
        verbose_name = _("event")
        verbose_name_plural = _("events")
        ordering = ("-created_at", "-id")
        indexes = [
            models.Index(fields=["kind", "created_at"], name="wh_event_kind_idx"),
            models.Index(fields=["worker_name", "created_at"], name="wh_event_worker_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.worker_name} {self.task_id}".strip()


class DetectorState(models.Model):
    """The single row shared by every detector: a lease on sweeps and the outage guard."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    last_sweep_at = models.DateTimeField(null=True, blank=True)
    #: start of the current run of sweeps with no gap longer than ``OUTAGE_GAP``
    observing_since = models.DateTimeField(null=True, blank=True)
    last_sweep_by = models.CharField(max_length=255, blank=True, default="")
    last_sweep_duration = models.FloatField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    #: the last sweep that looked for orphaned tasks of every worker, not only of the
    #: workers that died recently
    last_full_scan_at = models.DateTimeField(null=True, blank=True)

    objects = DetectorStateManager()

    class Meta:
        db_table = "worker_health_detector"
        verbose_name = _("detector state")

    def __str__(self) -> str:
        return "detector state"


def event(
    kind: str,
    *,
    worker: WorkerRegistry | None = None,
    worker_name: str = "",
    task_id: str = "",
    using: str | None = None,
    **details: Any,
) -> WorkerEvent:
    """Record an event in the audit log."""
    return WorkerEvent.objects.using(using).create(
        kind=kind,
        worker=worker,
        worker_name=worker_name or (worker.worker_id if worker else ""),
        task_id=task_id,
        details=details,
    )


class HealthOverview(WorkerRegistry):
    """The admin's overview page: a proxy with no table, so the admin index links to it."""

    class Meta:
        proxy = True
        verbose_name = _("health overview")
        verbose_name_plural = _("health overview")
        default_permissions = ("view",)

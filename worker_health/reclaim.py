"""Detection and reclamation: the one place that decides a worker is dead.

A *sweep* runs at most once per ``CHECK_INTERVAL`` across the whole cluster (a lease row in
the database): celery beat's ``detect_failed_workers`` task triggers it, and so does every
live worker's heart (on a thread of its own), so detection never waits behind a backlog
of user tasks.
A sweep

1. fails every active worker whose heartbeat is older than ``STALE_AFTER`` by the
   database's clock, unless the outage guard says the detector itself was not watching;
2. reclaims every task held by a worker incarnation that is no longer active (found from
   the workers that died recently, and every ``FULL_SCAN_EVERY`` intervals across every
   held task): the tasks are moved to ``reclaiming`` under row locks, a batch at a time,
   and after commit their recorded messages are published again, byte for byte, with the
   same task ids (or a task is quarantined once it has been reclaimed ``MAX_RECLAIMS``
   times);
3. re-publishes reclaims whose publish did not go through (the outbox).
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.db import connections, router, transaction
from django.db.models import BooleanField, ExpressionWrapper, F, Q
from django.db.models.functions import Now

from . import publish
from .conf import settings
from .models import (
    DetectorState,
    EventKind,
    TaskQueue,
    TaskStatus,
    WorkerEvent,
    WorkerRegistry,
    event,
)
from .querysets import SWEEP_SPACING, TaskQuerySet, db_now_minus
from .signals import task_quarantined, task_reclaimed, worker_failed

if TYPE_CHECKING:
    from .heartbeat import WorkerIdentity

logger = logging.getLogger("worker_health")


@dataclass
class SweepResult:
    swept: bool = False
    failed_workers: list[str] = field(default_factory=list)
    reclaimed: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)
    duration: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "swept": self.swept,
            "failed_workers": self.failed_workers,
            "reclaimed": self.reclaimed,
            "quarantined": self.quarantined,
            "republished": self.republished,
            "duration": round(self.duration, 4),
        }


@dataclass
class ReclaimOutcome:
    reclaimed: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)

    def extend(self, other: ReclaimOutcome) -> None:
        self.reclaimed += other.reclaimed
        self.quarantined += other.quarantined


# --------------------------------------------------------------------------------------------
# the sweep


def sweep(who: str, *, force: bool = False) -> SweepResult:
    """Run one detector sweep if no other detector ran one in the last ``CHECK_INTERVAL``."""
    result = SweepResult()
    spacing = settings.CHECK_INTERVAL * SWEEP_SPACING
    if not DetectorState.objects.take_sweep_lease(who, spacing, settings.OUTAGE_GAP, force):
        return result
    started = time.monotonic()
    result.swept = True
    result.failed_workers = fail_stale_workers()
    outcome = reclaim_orphans()
    result.reclaimed, result.quarantined = outcome.reclaimed, outcome.quarantined
    result.republished = flush_outbox()
    result.duration = time.monotonic() - started
    DetectorState.objects.record_sweep_done(result.duration)
    return result


def fail_stale_workers() -> list[str]:
    """Mark failed every active worker whose heartbeat is older than ``STALE_AFTER``.

    Outage guard: nobody is failed unless the detector has been sweeping without a pause
    longer than ``STALE_AFTER`` for at least ``STALE_AFTER``; heartbeats that could not be
    written while the database was down therefore never count against a worker.
    """
    stale_after = settings.STALE_AFTER
    if not DetectorState.objects.observed_for(stale_after):
        return []
    failed: list[str] = []
    candidates = WorkerRegistry.objects.stale(stale_after).values_list(
        "pk", "worker_id", "last_heartbeat"
    )
    for pk, worker_id, last_heartbeat in list(candidates):
        if not WorkerRegistry.objects.fail_if_stale(pk, stale_after):
            continue  # another detector got there first, or it just beat
        failed.append(worker_id)
        worker = WorkerRegistry.objects.get(pk=pk)
        event(
            EventKind.WORKER_FAILED,
            worker=worker,
            last_heartbeat=last_heartbeat.isoformat() if last_heartbeat else None,
            stale_after=stale_after,
        )
        logger.warning(
            "worker_failed: %s missed its heartbeats (last %s)",
            worker_id,
            last_heartbeat,
            extra={"worker_id": worker_id, "last_heartbeat": last_heartbeat},
        )
        worker_failed.send_robust(
            sender=WorkerRegistry, worker=worker, last_heartbeat=last_heartbeat
        )
    return failed


#: a sweep looks at every held task for orphans at most this many check intervals apart;
#: the others look only at the workers that died in the last ``2 x FULL_SCAN_EVERY``
FULL_SCAN_EVERY = 10


def reclaim_orphans(*, full: bool | None = None) -> ReclaimOutcome:
    """Reclaim every task held by a worker incarnation that is no longer active.

    A sweep starts from the workers that died recently (failed, or done draining, in the
    last ``2 x FULL_SCAN_EVERY`` check intervals: found by index) and takes their held
    tasks by the held-tasks index, so its cost follows the dead workers and their tasks,
    not how many tasks the live workers hold. Every ``FULL_SCAN_EVERY`` check intervals
    one sweep (``full``) looks at every held task instead, the safety net for what the
    fast path cannot see: rows of an older incarnation of a live worker whose reclaim at
    registration failed, a worker dead before a detector outage longer than the window.
    """
    interval = settings.CHECK_INTERVAL * FULL_SCAN_EVERY
    if full is None:
        full = DetectorState.objects.take_full_scan(interval * 0.9)
    if full:
        holders = list(
            TaskQueue.objects.orphaned().order_by().values_list("claimed_by", flat=True).distinct()
        )
    else:
        holders = list(
            WorkerRegistry.objects.recently_dead(2 * interval, settings.STALE_AFTER)
            .holding_tasks()
            .values_list("pk", flat=True)
        )
    outcome = ReclaimOutcome()
    for worker_pk in holders:
        worker = WorkerRegistry.objects.filter(pk=worker_pk).first()
        if worker is None:
            continue
        reason = "worker failed" if worker.status == "failed" else f"worker {worker.status}"
        outcome.extend(
            reclaim(
                TaskQueue.objects.orphaned().filter(claimed_by=worker_pk),
                reason=reason,
                worker_name=worker.worker_id,
            )
        )
    return outcome


def reclaim_tasks_of(worker: WorkerRegistry, *, reason: str = "manual") -> ReclaimOutcome:
    """Reclaim what ``worker`` holds. For a live worker only its older incarnations' tasks
    are taken, unless ``reason`` is ``"manual"`` (an operator's decision)."""
    qs = TaskQueue.objects.held_by(worker)
    if reason != "manual" and worker.status == "active":
        qs = qs.exclude(claimed_incarnation=worker.incarnation)
    return reclaim(qs, reason=reason, worker_name=worker.worker_id)


def reclaim_lost_task(task_id: str, identity: WorkerIdentity) -> ReclaimOutcome:
    """A prefork child died running ``task_id`` (``WorkerLostError``): reclaim it now."""
    qs = TaskQueue.objects.filter(
        task_id=task_id,
        status=TaskStatus.CLAIMED,
        claimed_by=identity.pk,
        claimed_incarnation=identity.incarnation,
    )
    return reclaim(qs, reason="worker process lost", worker_name=identity.worker_id, started=True)


def hand_back(
    identity: WorkerIdentity, *, include_running: bool, unfinished: Iterable[str] = ()
) -> ReclaimOutcome:
    """Shutdown: publish again what this worker received but will not run: everything it
    holds on a cold shutdown; on a warm one (running tasks are done by then) the tasks it
    received and did not start, and the ``unfinished`` ones (claimed, never run)."""
    held = Q(status="reserved")
    if include_running:
        held |= Q(status="claimed")
    else:
        ids = list(unfinished)
        if ids:
            held |= Q(status="claimed", task_id__in=ids)
    qs = TaskQueue.objects.filter(
        held, claimed_by=identity.pk, claimed_incarnation=identity.incarnation
    )
    return reclaim(qs, reason="shutdown", worker_name=identity.worker_id, count=False)


# --------------------------------------------------------------------------------------------
# the mechanism


def _lockable(qs: TaskQuerySet, db: str) -> TaskQuerySet:
    features = connections[db].features
    if features.has_select_for_update_skip_locked:
        return qs.select_for_update(skip_locked=True)
    if features.has_select_for_update:
        return qs.select_for_update()
    # SQLite: writers are serialized; the conditional UPDATEs below decide who wins.
    return qs


def reclaim(
    qs: TaskQuerySet,
    *,
    reason: str,
    worker_name: str,
    count: bool = True,
    started: bool = False,
    batch_size: int = 500,
) -> ReclaimOutcome:
    """Move the held tasks in ``qs`` to ``reclaiming`` (or ``quarantined``) and publish
    them again after commit. Safe to run from several processes at once: each task is
    moved by exactly one of them, and only that one publishes it.

    Set-based: per batch of ``batch_size`` rows, one locking SELECT, one UPDATE per group
    of rows that change alike (usually one), and after commit one SELECT, the publishes,
    an UPDATE per 100 published and one INSERT of the batch's events. The rows are locked
    (``FOR UPDATE SKIP LOCKED``: a concurrent reclaimer takes other rows) or, on SQLite,
    read and written in one serializable transaction, so the UPDATE by primary key
    changes exactly the rows read, in the state they were read in.

    What counts against ``MAX_RECLAIMS`` (with ``count``): a reclaim of a run that had
    started, or may have. A task's first run writes nothing when it starts (that would be
    a second statement per task), so it is presumed started; every later run records its
    start before its code runs (``started_token``), so a reclaimed task that only waited
    in a dead worker's prefetch buffer again is not counted. ``started``: the caller knows
    the run had started (a prefork child died running it).
    """
    db = router.db_for_write(TaskQueue)
    outcome = ReclaimOutcome()
    max_reclaims = settings.MAX_RECLAIMS
    while True:
        lease = uuid.uuid4()
        batch = ReclaimOutcome()
        quarantined_rows: list[dict[str, Any]] = []
        with transaction.atomic(using=db):
            rows = _held_rows(qs, db, batch_size)
            if not rows:
                break
            groups: dict[tuple[str, bool, tuple[str, ...]], list[int]] = {}
            for row in rows:
                # A task killed while running counts against its budget; one that was only
                # waiting in the dead worker's prefetch buffer does not.
                counts = count and row["status"] == TaskStatus.CLAIMED and (started or ran(row))
                quarantine = counts and row["reclaim_count"] >= max_reclaims
                status: str
                if quarantine:
                    status = TaskStatus.QUARANTINED
                elif not row["has_body"]:
                    # Never recorded its message (died within milliseconds of receiving
                    # it): nothing to publish; mark it queued for the broker's redelivery.
                    status = TaskStatus.QUEUED
                else:
                    status = TaskStatus.RECLAIMING
                lost_on = list(row["lost_on"] or [])
                if counts:
                    lost_on = [*lost_on, worker_name][-20:]
                key = (status, counts, tuple(lost_on))
                groups.setdefault(key, []).append(row["pk"])
                if quarantine:
                    batch.quarantined.append(row["task_id"])
                    quarantined_rows.append({**row, "lost_on": lost_on})
                else:
                    batch.reclaimed.append(row["task_id"])
            for (status, counts, lost_on_key), pks in groups.items():
                updates: dict[str, Any] = {
                    "status": status,
                    "claimed_by": None,
                    "claimed_incarnation": None,
                    "reclaimed_at": Now(),
                    "updated_at": Now(),
                    "lost_on": list(lost_on_key),
                }
                if counts:
                    updates["reclaim_count"] = F("reclaim_count") + 1
                if status == TaskStatus.QUARANTINED:
                    updates["finished_at"] = Now()
                elif status == TaskStatus.RECLAIMING:
                    updates.update(reclaim_lease=lease, publish_attempts=0)
                TaskQueue.objects.using(db).filter(pk__in=pks).update(**updates)
            transaction.on_commit(
                functools.partial(
                    _after_commit, lease, batch, quarantined_rows, reason, worker_name, db
                ),
                using=db,
            )
        outcome.extend(batch)
        if len(rows) < batch_size:
            break
    return outcome


def _held_rows(qs: TaskQuerySet, db: str, batch_size: int) -> list[dict[str, Any]]:
    """The next ``batch_size`` held rows of ``qs``, locked (skipping rows another reclaimer
    holds) where the database can."""
    rows = (
        _lockable(qs.using(db).filter(status__in=("reserved", "claimed")), db)
        .order_by("pk")
        .annotate(has_body=ExpressionWrapper(Q(body__isnull=False), output_field=BooleanField()))
        .values(
            "pk",
            "task_id",
            "task_name",
            "status",
            "reclaim_count",
            "lost_on",
            "has_body",
            "fencing_token",
            "started_token",
        )[:batch_size]
    )
    return [dict(row) for row in rows]


def ran(row: dict[str, Any]) -> bool:
    """Whether the claimed run of a held row had started, or may have: a first run (token
    1, which records no start) is presumed to; a later one only if it recorded its start."""
    return bool(row["fencing_token"] <= 1 or row["started_token"] == row["fencing_token"])


def _after_commit(
    lease: uuid.UUID,
    batch: ReclaimOutcome,
    quarantined_rows: list[dict[str, Any]],
    reason: str,
    worker_name: str,
    db: str,
) -> None:
    published = publish_reclaimed(Q(reclaim_lease=lease), db)
    results_integration.reset_started(batch.reclaimed)
    tasks = {
        task.task_id: task
        for task in TaskQueue.objects.using(db).filter(
            task_id__in=[*batch.reclaimed, *(row["task_id"] for row in quarantined_rows)]
        )
    }
    events = [
        WorkerEvent(
            kind=EventKind.TASK_RECLAIMED,
            worker_name=worker_name,
            task_id=task_id,
            details={
                "reason": reason,
                "published": task_id in published,
                "reclaim_count": tasks[task_id].reclaim_count if task_id in tasks else None,
            },
        )
        for task_id in batch.reclaimed
    ]
    messages = {
        row["task_id"]: quarantine_message(row["task_name"], row["lost_on"])
        for row in quarantined_rows
    }
    events += [
        WorkerEvent(
            kind=EventKind.TASK_QUARANTINED,
            worker_name=worker_name,
            task_id=row["task_id"],
            details={"message": messages[row["task_id"]], "lost_on": row["lost_on"]},
        )
        for row in quarantined_rows
    ]
    WorkerEvent.objects.using(db).bulk_create(events, batch_size=500)
    for task_id in batch.reclaimed:
        logger.warning(
            "task_reclaimed: %s from %s (%s)",
            task_id,
            worker_name,
            reason,
            extra={"task_id": task_id, "worker_id": worker_name, "reason": reason},
        )
        if task_id in tasks:
            task_reclaimed.send_robust(
                sender=TaskQueue, task=tasks[task_id], worker_id=worker_name, reason=reason
            )
    for row in quarantined_rows:
        message = messages[row["task_id"]]
        results_integration.mark_quarantined(row["task_id"], message)
        logger.error(
            "task_quarantined: %s",
            message,
            extra={"task_id": row["task_id"], "worker_id": worker_name},
        )
        task_quarantined.send_robust(
            sender=TaskQueue, task=tasks.get(row["task_id"]), worker_id=worker_name
        )


def quarantine_message(task_name: str, lost_on: Iterable[str]) -> str:
    counts: dict[str, int] = {}
    for name in lost_on:
        counts[name] = counts.get(name, 0) + 1
    killed = ", ".join(f"{name} ({n}x)" for name, n in counts.items())
    total = sum(counts.values())
    return (
        f"worker_health quarantined {task_name}: its worker died while running it {total} "
        f"times (WORKER_HEALTH_MAX_RECLAIMS={settings.MAX_RECLAIMS}); workers lost: {killed}. "
        f"It will not run again unless an operator requeues it."
    )


def publish_reclaimed(condition: Q, db: str) -> set[str]:
    """Publish the ``reclaiming`` rows matching ``condition``; mark them queued once sent
    (an UPDATE per ``MARK_EVERY`` published: a crash in between leaves at most that many
    to be published again by the outbox, a copy the claim skips)."""
    published: set[str] = set()
    sent: list[int] = []

    def mark_sent() -> None:
        if sent:
            TaskQueue.objects.using(db).filter(pk__in=sent, status=TaskStatus.RECLAIMING).filter(
                condition
            ).update(
                status=TaskStatus.QUEUED,
                reclaim_lease=None,
                publish_attempts=F("publish_attempts") + 1,
                updated_at=Now(),
            )
            sent.clear()

    rows = TaskQueue.objects.using(db).filter(condition, status=TaskStatus.RECLAIMING)
    pks = list(rows.order_by("pk").values_list("pk", flat=True))
    tasks = (
        task
        for start in range(0, len(pks), MARK_EVERY)
        for task in rows.filter(pk__in=pks[start : start + MARK_EVERY]).order_by("pk")
    )
    for task in tasks:
        try:
            publish.republish(task)
        except Exception:
            logger.exception(
                "worker_health: could not publish reclaimed task %s; the next sweep retries",
                task.task_id,
                extra={"task_id": task.task_id},
            )
            continue
        sent.append(task.pk)
        published.add(task.task_id)
        if len(sent) >= MARK_EVERY:
            mark_sent()
    mark_sent()
    return published


#: published reclaims are marked queued in groups of this many
MARK_EVERY = 100


def outbox_grace() -> float:
    return max(5.0, 2 * settings.CHECK_INTERVAL)


#: how often a reclaimed message that no live worker picked up is published again
MAX_PUBLISH_ATTEMPTS = 5


def flush_outbox() -> list[str]:
    """Publish again what a reclaim published (or tried to) but no live worker took.

    * ``reclaiming`` rows older than the grace: the publish failed (broker down, detector
      killed between commit and publish);
    * ``queued`` rows of a reclaim that no live worker reserved within the grace, doubling
      each time: the broker handed the message to a consumer that is not running (RabbitMQ
      pushes to a paused worker's prefetch window). A copy that arrives twice is skipped at
      claim time, so publishing again is safe.
    """
    db = router.db_for_write(TaskQueue)
    grace = outbox_grace()
    stuck = TaskQueue.objects.using(db).filter(
        status=TaskStatus.RECLAIMING, reclaimed_at__lt=db_now_minus(grace)
    )
    unpicked = Q()
    for attempts in range(1, MAX_PUBLISH_ATTEMPTS):
        unpicked |= Q(publish_attempts=attempts, reclaimed_at__lt=db_now_minus(grace * 2**attempts))
    unclaimed = TaskQueue.objects.using(db).filter(
        unpicked,
        status=TaskStatus.QUEUED,
        publish_attempts__gt=0,  # wh_task_unpicked_idx
        reclaimed_at__isnull=False,
        body__isnull=False,
    )
    lease = uuid.uuid4()
    taken = 0
    for qs in (stuck, unclaimed):
        for pk, status, old_lease, old_at in list(
            qs.values_list("pk", "status", "reclaim_lease", "reclaimed_at")[:1000]
        ):
            taken += (
                TaskQueue.objects.using(db)
                .filter(pk=pk, status=status, reclaim_lease=old_lease, reclaimed_at=old_at)
                .update(status=TaskStatus.RECLAIMING, reclaim_lease=lease, reclaimed_at=Now())
            )
    if not taken:
        return []
    return sorted(publish_reclaimed(Q(reclaim_lease=lease), db))


# imported last: it needs nothing from here at import time
from . import results_integration  # noqa: E402

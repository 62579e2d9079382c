"""Rows for the dashboard, endpoint and metrics tests, written with the database's clock."""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.contrib.auth.models import Permission, User

from worker_health.models import EventKind, TaskQueue, WorkerEvent, WorkerRegistry
from worker_health.querysets import db_now_minus


def make_worker(
    worker_id: str,
    *,
    status: str = "active",
    heartbeat_age: float = 1.0,
    changed_ago: float = 0.0,
    started_ago: float = 3600.0,
    metadata: dict[str, Any] | None = None,
    clock_skew: float | None = 0.012,
    tasks_processed: int = 0,
) -> WorkerRegistry:
    meta = {
        "host": worker_id.split("@")[-1],
        "pid": 4242,
        "pool": "prefork",
        "concurrency": 4,
        "queues": ["celery", "priority"],
    }
    meta.update(metadata or {})
    worker = WorkerRegistry.objects.create(
        worker_id=worker_id,
        status=status,
        incarnation=uuid.uuid4(),
        last_heartbeat=db_now_minus(heartbeat_age),
        started_at=db_now_minus(started_ago),
        status_changed_at=db_now_minus(changed_ago),
        metadata=meta,
        clock_skew=clock_skew,
        tasks_processed=tasks_processed,
    )
    worker.refresh_from_db()
    return worker


def json_body(*args: Any, **kwargs: Any) -> bytes:
    """A Celery protocol 2 JSON body: ``[args, kwargs, embed]``."""
    return json.dumps([list(args), kwargs, {"callbacks": None}]).encode()


def make_task(task_id: str, *, worker: WorkerRegistry | None = None, **fields: Any) -> TaskQueue:
    values: dict[str, Any] = {
        "task_name": "demo.tasks.work",
        "status": "claimed" if worker else "queued",
        "queue": "celery",
        "routing_key": "celery",
        "body": json_body(7, email="person@example.com"),
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "headers": {
            "id": task_id,
            "task": "demo.tasks.work",
            "argsrepr": "(7,)",
            "kwargsrepr": "{'email': 'person@example.com'}",
        },
        "properties": {"correlation_id": task_id},
    }
    if worker is not None:
        values.update(claimed_by=worker, claimed_incarnation=worker.incarnation, fencing_token=1)
    values.update(fields)
    return TaskQueue.objects.create(task_id=task_id, **values)


def make_event(kind: str, *, hours_ago: float = 0.0, **fields: Any) -> WorkerEvent:
    ev = WorkerEvent.objects.create(kind=kind, **fields)
    if hours_ago:
        WorkerEvent.objects.filter(pk=ev.pk).update(created_at=db_now_minus(hours_ago * 3600))
    return ev


def staff_user(username: str = "operator", *perms: str) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


def scenario() -> dict[str, Any]:
    """A cluster after a failure: one active, one late, one failed, one offline worker,
    reclaimed and quarantined tasks, and the events of the last hours."""
    active = make_worker("alpha@web-1", heartbeat_age=1, tasks_processed=120)
    late = make_worker("beta@web-2", heartbeat_age=45, tasks_processed=30)
    failed = make_worker(
        "gamma@web-3", status="failed", heartbeat_age=400, changed_ago=300, tasks_processed=9
    )
    offline = make_worker("delta@web-4", status="offline", heartbeat_age=9000, changed_ago=9000)
    running = make_task("task-running-1", worker=active)
    reclaimed = make_task(
        "task-reclaimed-1",
        status="queued",
        reclaim_count=1,
        fencing_token=2,
        lost_on=[failed.worker_id],
    )
    quarantined = make_task(
        "task-quarantined-1",
        status="quarantined",
        reclaim_count=3,
        fencing_token=4,
        lost_on=[failed.worker_id] * 3,
    )
    make_event(
        EventKind.WORKER_REGISTERED, worker=active, worker_name=active.worker_id, hours_ago=5
    )
    make_event(EventKind.WORKER_FAILED, worker=failed, worker_name=failed.worker_id, hours_ago=0.1)
    make_event(
        EventKind.TASK_RECLAIMED,
        worker_name=failed.worker_id,
        task_id=reclaimed.task_id,
        hours_ago=0.1,
        details={"reason": "worker failed"},
    )
    make_event(
        EventKind.TASK_QUARANTINED,
        worker_name=failed.worker_id,
        task_id=quarantined.task_id,
        hours_ago=0.1,
    )
    make_event(EventKind.TASK_RECLAIMED, worker_name="old@web-9", task_id="older-1", hours_ago=3)
    return {
        "active": active,
        "late": late,
        "failed": failed,
        "offline": offline,
        "running": running,
        "reclaimed": reclaimed,
        "quarantined": quarantined,
    }

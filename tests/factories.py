"""Rows for unit tests, written the way the package writes them (database clock included)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.conf import settings

from worker_health.models import DetectorState, TaskQueue, WorkerRegistry
from worker_health.querysets import Delivery, db_now_minus

#: a test of PostgreSQL's own behaviour (plans, one-statement paths): skipped, with the
#: reason, unless WORKER_HEALTH_TEST_DATABASE_URL gave tests/settings.py a ``postgres`` alias
needs_postgres = pytest.mark.skipif(
    "postgres" not in settings.DATABASES,
    reason="PostgreSQL tests need WORKER_HEALTH_TEST_DATABASE_URL "
    "(e.g. postgres://root@127.0.0.1:5432/test)",
)

#: database aliases to run database-clock tests on: the SQLite default always, PostgreSQL
#: when WORKER_HEALTH_TEST_DATABASE_URL gave tests/settings.py a ``postgres`` alias
ALIASES = [
    pytest.param("default", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=needs_postgres),
]


def make_worker(
    alias: str,
    worker_id: str = "w1@host",
    *,
    status: str = "active",
    heartbeat_age: float | None = None,
    incarnation: uuid.UUID | None = None,
) -> WorkerRegistry:
    """Register a worker as a starting worker does; optionally age its heartbeat (by the
    database's clock) and set its status."""
    registration = WorkerRegistry.objects.using(alias).register(
        worker_id, incarnation=incarnation or uuid.uuid4(), metadata={"host": "host"}
    )
    worker = registration.worker
    updates: dict[str, Any] = {}
    if heartbeat_age is not None:
        updates["last_heartbeat"] = db_now_minus(heartbeat_age)
    if status != "active":
        updates["status"] = status
    if updates:
        WorkerRegistry.objects.using(alias).filter(pk=worker.pk).update(**updates)
        worker.refresh_from_db(using=alias)
    return worker


def age_heartbeat(alias: str, worker: WorkerRegistry, seconds: float) -> None:
    WorkerRegistry.objects.using(alias).filter(pk=worker.pk).update(
        last_heartbeat=db_now_minus(seconds)
    )


def delivery(task_id: str, **overrides: Any) -> Delivery:
    fields: dict[str, Any] = {
        "task_id": task_id,
        "task_name": "demo.tasks.work",
        "queue": "celery",
        "exchange": "",
        "routing_key": "celery",
        "body": b'[[], {"seconds": 0}, {}]',
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "headers": {"id": task_id, "task": "demo.tasks.work"},
        "properties": {"correlation_id": task_id, "delivery_mode": 2},
        "eta": None,
        "expires": None,
    }
    fields.update(overrides)
    return Delivery(**fields)


def make_task(alias: str, task_id: str, **fields: Any) -> TaskQueue:
    """A tracked task row with a recorded message (publishable)."""
    values: dict[str, Any] = {
        "task_name": "demo.tasks.work",
        "queue": "celery",
        "routing_key": "celery",
        "body": b'[[], {"seconds": 0}, {}]',
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "headers": {"id": task_id, "task": "demo.tasks.work"},
        "properties": {},
    }
    values.update(fields)
    return TaskQueue.objects.using(alias).create(task_id=task_id, **values)


def claimed_task(alias: str, task_id: str, worker: WorkerRegistry, **fields: Any) -> TaskQueue:
    """A task that ``worker`` (its current incarnation) claimed and is running."""
    make_task(alias, task_id, **fields)
    token = TaskQueue.objects.using(alias).claim(
        task_id=task_id,
        task_name="demo.tasks.work",
        queue="celery",
        worker_pk=worker.pk,
        incarnation=worker.incarnation,
    )
    assert token is not None
    return TaskQueue.objects.using(alias).get(task_id=task_id)


def watched_for(alias: str, seconds: float, last_sweep_age: float = 1.0) -> None:
    """Make the detector believe it has been sweeping without a pause for ``seconds``, the
    last sweep ``last_sweep_age`` seconds ago (by the database's clock)."""
    rows = DetectorState.objects.using(alias)
    rows.filter(pk=1).delete()
    rows.create(
        pk=1,
        observing_since=db_now_minus(seconds),
        last_sweep_at=db_now_minus(last_sweep_age),
    )

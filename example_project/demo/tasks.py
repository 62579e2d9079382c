"""Tasks used by the demo and the integration tests. Each records its effect in ``Effect``
(unique on task id, with a run counter) so "ran exactly once" can be checked."""

from __future__ import annotations

import os
import signal
import time

from celery import shared_task
from django.db import IntegrityError, connection, transaction
from django.db.models import F

from .models import Effect


def record(task, label: str = "") -> None:
    task_id = task.request.id
    worker = task.request.hostname or ""
    # The connection may have been opened before a long run (the result backend stores
    # STARTED) and broken since (the tests cut the database): check it before writing.
    if connection.connection is not None and not connection.is_usable():
        connection.close()
    try:
        with transaction.atomic():
            Effect.objects.create(task_id=task_id, label=label, worker=worker)
    except IntegrityError:
        Effect.objects.filter(task_id=task_id).update(runs=F("runs") + 1, worker=worker)


@shared_task(bind=True)
def work(self, seconds: float = 0.0, label: str = "") -> str:
    """Sleep ``seconds`` (a stand-in for I/O-bound work), then record the effect."""
    if seconds:
        time.sleep(seconds)
    record(self, label)
    return self.request.id


@shared_task(bind=True)
def burn(self, seconds: float, label: str = "") -> int:
    """Hold the CPU (and the GIL) for ``seconds``, then record the effect."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += sum(i * i for i in range(2000))
    record(self, label)
    return n


@shared_task(bind=True)
def poison(self) -> None:
    """Kill the worker's pool process (or the worker itself with the solo pool)."""
    Effect.objects.get_or_create(task_id=f"poison-attempt-{time.time_ns()}", label="poison")
    os.kill(os.getpid(), signal.SIGKILL)


@shared_task(bind=True)
def poison_worker(self) -> None:
    """Kill the whole worker, main process and pool (what the OOM killer or a lost host
    does): no ``WorkerLostError`` tells anyone which task did it."""
    Effect.objects.get_or_create(task_id=f"poison-attempt-{time.time_ns()}", label="poison")
    os.killpg(os.getpgid(0), signal.SIGKILL)


@shared_task(bind=True)
def noop(self) -> None:
    return None


@shared_task(bind=True, max_retries=3)
def flaky(self, label: str = "") -> str:
    """Fail the first run with a retry, succeed the second: a retry must run again."""
    if self.request.retries == 0:
        raise self.retry(countdown=0.5)
    record(self, label)
    return self.request.id


@shared_task(bind=True)
def add(self, x: int, y: int) -> int:
    record(self, "add")
    return x + y


@shared_task(bind=True)
def total(self, values: list[int]) -> int:
    record(self, "total")
    return sum(values)

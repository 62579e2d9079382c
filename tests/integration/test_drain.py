"""Draining: an operator marks a live worker offline; it finishes its work and leaves."""

from __future__ import annotations

import time

import pytest

from example_project.demo.models import Effect
from tests.integration.harness import Stack, wait_for
from worker_health.models import EventKind, TaskQueue, WorkerEvent, WorkerRegistry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True, databases="__all__"),
]

DRAIN = "from worker_health import drain; print(drain.mark_offline({node!r}, drained_by='test'))"


def test_drained_worker_finishes_its_task_and_shuts_down(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    node = stack.node("drained")
    worker = stack.worker("drained", concurrency=1)
    ids = stack.publish("work", 1, kwargs={"seconds": 6, "label": "drain"})
    wait_for(
        lambda: TaskQueue.objects.using(stack.alias).filter(task_id=ids[0], status="claimed"),
        60,
        what="the task to run",
    )
    assert "True" in stack.manage("shell", "-c", DRAIN.format(node=node))
    # it keeps heartbeating while it drains: STALE_AFTER (3 s) passes, nothing is reclaimed
    time.sleep(4)
    assert worker.alive()
    assert WorkerRegistry.objects.using(stack.alias).get(worker_id=node).status == "offline"
    assert worker.popen.wait(60) == 0, worker.log()[-3000:]
    assert Effect.objects.using(stack.alias).get(task_id=ids[0]).runs == 1
    assert TaskQueue.objects.using(stack.alias).get(task_id=ids[0]).status == "succeeded"
    assert (
        not WorkerEvent.objects.using(stack.alias)
        .filter(kind__in=[EventKind.TASK_RECLAIMED, EventKind.WORKER_FAILED])
        .exists()
    )
    assert worker.count("shutting down warmly") == 1

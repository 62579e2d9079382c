from __future__ import annotations

import signal

import pytest

from tests.integration.harness import Stack, wait_for
from worker_health.models import TaskQueue, WorkerRegistry

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True, databases="__all__")]


def test_worker_registers_and_kill_is_detected(stack: Stack) -> None:
    w1 = stack.worker("w1")
    stack.worker("w2", pool="threads")
    ids = stack.publish("work", 6, kwargs={"seconds": 0.2})
    wait_for(
        lambda: TaskQueue.objects.using(stack.alias).filter(task_id__in=ids, status="succeeded").count() == 6,
        60,
        what="tasks to succeed",
    )
    w1.kill_group()
    wait_for(
        lambda: WorkerRegistry.objects.using(stack.alias).filter(worker_id=stack.node("w1"), status="failed").exists(),
        15,
        what="w1 failed",
    )
    assert WorkerRegistry.objects.using(stack.alias).get(worker_id=stack.node("w2")).status == "active"
    assert signal.SIGKILL

"""Task tracking with real workers: life cycle, retries, canvas, duplicates, hand-back."""

from __future__ import annotations

import json
import signal
import time

import pytest
from django_celery_results.models import TaskResult

from example_project.demo.models import Effect
from tests.integration.harness import Stack, wait_for
from worker_health.models import EventKind, TaskQueue, WorkerEvent, WorkerRegistry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True, databases="__all__"),
]


def test_life_cycle_and_message_recorded(stack: Stack) -> None:
    stack.worker("life", concurrency=1)
    ids = stack.publish("work", 2, kwargs={"seconds": 0.1, "label": "life"})
    wait_for(
        lambda: (
            TaskQueue.objects.using(stack.alias).filter(task_id__in=ids, status="succeeded").count()
            == 2
        ),
        60,
        what="tasks to succeed",
    )
    row = TaskQueue.objects.using(stack.alias).get(task_id=ids[0])
    assert row.task_name == "example_project.demo.tasks.work"
    assert row.claimed_by is not None and row.claimed_by.worker_id == stack.node("life")
    assert row.fencing_token == 1 and row.reclaim_count == 0
    assert row.finished_at is not None
    # the message as delivered: raw JSON body (protocol 2: [args, kwargs, embed])
    assert row.content_type == "application/json"
    args, kwargs, _embed = json.loads(bytes(row.body))
    assert args == []
    assert kwargs == {"seconds": 0.1, "label": "life"}
    assert row.headers["id"] == ids[0] and row.headers["task"] == row.task_name
    assert row.routing_key == stack.queue


def test_retry_goes_back_to_queued_and_runs_again(stack: Stack) -> None:
    stack.worker("retrier", concurrency=2)
    ids = stack.publish("flaky", 3, kwargs={"label": "flaky"})
    wait_for(
        lambda: Effect.objects.using(stack.alias).filter(task_id__in=ids).count() == 3,
        60,
        what="retried tasks to take effect",
    )
    wait_for(
        lambda: (
            TaskQueue.objects.using(stack.alias)
            .filter(task_id__in=ids, status="succeeded", fencing_token=2)
            .count()
            == 3
        ),
        30,
        what="each retried task claimed twice and succeeded",
    )
    assert (
        not WorkerEvent.objects.using(stack.alias)
        .filter(kind__in=[EventKind.DUPLICATE_DELIVERY, EventKind.STALE_COMPLETION])
        .exists()
    )


def test_canvas_still_behaves(stack: Stack) -> None:
    stack.worker("canvas1", concurrency=2)
    stack.worker("canvas2", concurrency=2, pool="threads")
    out = json.loads(stack.manage("demo_canvas", "--size", "3").strip().splitlines()[-1])

    def result(task_id: str) -> str | None:
        row = (
            TaskResult.objects.using(stack.alias)
            .filter(task_id=task_id, status="SUCCESS")
            .values_list("result", flat=True)
            .first()
        )
        return row

    assert wait_for(lambda: result(out["chain"]), 60, what="chain result") == str(
        out["chain_expected"]
    )
    assert wait_for(lambda: result(out["chord"]), 60, what="chord result") == str(
        out["chord_expected"]
    )
    for task_id in out["group"]:
        wait_for(lambda task_id=task_id: result(task_id), 60, what="group member")
    assert (
        not WorkerEvent.objects.using(stack.alias)
        .filter(kind__in=[EventKind.DUPLICATE_DELIVERY, EventKind.STALE_COMPLETION])
        .exists()
    )
    assert (
        TaskQueue.objects.using(stack.alias)
        .exclude(task_name__startswith="worker_health.")
        .exclude(status="succeeded")
        .filter(task_name__startswith="example_project.")
        .count()
        == 0
    )


REPUBLISH = """
from worker_health.models import TaskQueue
from worker_health.publish import republish
republish(TaskQueue.objects.get(task_id={task_id!r}))
"""


def test_redelivery_of_a_finished_task_does_not_run_again(stack: Stack) -> None:
    stack.worker("dedup", concurrency=1)
    ids = stack.publish("work", 1, kwargs={"seconds": 0, "label": "dedup"})
    wait_for(
        lambda: TaskQueue.objects.using(stack.alias).filter(task_id=ids[0], status="succeeded"),
        60,
        what="success",
    )
    # What Redis does after its visibility timeout, or RabbitMQ after a connection loss:
    # the same message arrives again.
    stack.manage("shell", "-c", REPUBLISH.format(task_id=ids[0]))
    wait_for(
        lambda: (
            WorkerEvent.objects.using(stack.alias)
            .filter(kind=EventKind.DUPLICATE_DELIVERY, task_id=ids[0])
            .exists()
        ),
        30,
        what="the duplicate delivery to be skipped",
    )
    assert Effect.objects.using(stack.alias).get(task_id=ids[0]).runs == 1


def test_warm_shutdown_hands_back_reserved_tasks(sqlite_stack: Stack) -> None:
    # kombu's filesystem transport drops a message once a worker has read it: without the
    # hand-back, tasks a worker holds for their ETA when it shuts down would be lost.
    stack = sqlite_stack
    leaving = stack.worker("leaving", concurrency=1)
    ids = stack.publish("work", 3, kwargs={"seconds": 0, "label": "handback"}, countdown=6)
    wait_for(
        lambda: (
            TaskQueue.objects.using(stack.alias)
            .filter(claimed_by__worker_id=stack.node("leaving"), status="reserved")
            .count()
            == 3
        ),
        60,
        what="the ETA tasks to be reserved",
    )
    leaving.signal(signal.SIGTERM)
    assert leaving.popen.wait(60) == 0
    assert (
        WorkerRegistry.objects.using(stack.alias).get(worker_id=stack.node("leaving")).status
        == "offline"
    )
    assert (
        WorkerEvent.objects.using(stack.alias)
        .filter(kind=EventKind.TASK_RECLAIMED, details__reason="shutdown")
        .count()
        == 3
    )
    stack.worker("staying", concurrency=2)
    wait_for(
        lambda: Effect.objects.using(stack.alias).filter(task_id__in=ids).count() == 3,
        60,
        what="every task to run",
    )
    time.sleep(2)
    runs = Effect.objects.using(stack.alias).filter(task_id__in=ids).values_list("runs", flat=True)
    assert set(runs) == {1}
    # handing back is not the task's fault: its reclaim budget is untouched
    assert set(
        TaskQueue.objects.using(stack.alias)
        .filter(task_id__in=ids)
        .values_list("reclaim_count", flat=True)
    ) == {0}


def test_reclaimed_task_does_not_stay_started_in_results(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    victim = stack.worker("started", concurrency=1)
    ids = stack.publish("work", 1, kwargs={"seconds": 30})
    wait_for(
        lambda: TaskResult.objects.using(stack.alias).filter(task_id=ids[0], status="STARTED"),
        60,
        what="STARTED in django-celery-results",
    )
    victim.kill_group()
    # no other worker: the task waits in the broker, and its result must say so
    stack.manage("worker_health", "detect")
    wait_for(
        lambda: (
            (stack.manage("worker_health", "detect") and False)
            or TaskQueue.objects.using(stack.alias).filter(task_id=ids[0], status="queued").exists()
        ),
        30,
        what="the task to be reclaimed",
    )
    assert TaskResult.objects.using(stack.alias).get(task_id=ids[0]).status == "PENDING"


def test_revoked_task_is_recorded(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    stack.worker("revoker", concurrency=1)
    # Celery reports the revoke (task_revoked) when the ETA comes and the task is skipped
    ids = stack.publish("work", 1, kwargs={"seconds": 0}, countdown=5)
    wait_for(
        lambda: TaskQueue.objects.using(stack.alias).filter(task_id=ids[0], status="reserved"),
        30,
        what="the ETA task to be reserved",
    )
    stack.manage(
        "shell",
        "-c",
        f"from example_project.celery import app; app.control.revoke({ids[0]!r})",
    )
    wait_for(
        lambda: TaskQueue.objects.using(stack.alias).filter(task_id=ids[0], status="revoked"),
        30,
        what="revoked",
    )


def test_application_publishing_a_finished_id_again_runs_it_again(sqlite_stack: Stack) -> None:
    # Celery runs every message the application publishes, even under a finished task's id
    # (a reused signature does that); only redeliveries of the same message are skipped.
    stack = sqlite_stack
    stack.worker("again", concurrency=1)
    stack.publish("work", 1, kwargs={"seconds": 0}, prefix="reused")
    wait_for(
        lambda: TaskQueue.objects.using(stack.alias).filter(task_id="reused-0", status="succeeded"),
        60,
        what="the first run",
    )
    stack.publish("work", 1, kwargs={"seconds": 0}, prefix="reused")
    wait_for(
        lambda: Effect.objects.using(stack.alias).filter(task_id="reused-0", runs=2).exists(),
        60,
        what="the second run",
    )
    row = TaskQueue.objects.using(stack.alias).get(task_id="reused-0")
    assert row.fencing_token == 2
    assert (
        not WorkerEvent.objects.using(stack.alias)
        .filter(kind=EventKind.DUPLICATE_DELIVERY)
        .exists()
    )


def test_warm_shutdown_hands_back_prefetched_tasks_and_runs_nothing_twice(
    sqlite_stack: Stack,
) -> None:
    # Prefetched tasks (no ETA) are claimed by the gate and queued for the pool. On a warm
    # shutdown the pool finishes what it was given, and what it was not given is published
    # again (the filesystem transport has dropped the messages): none lost, none run twice,
    # whichever way a given task goes.
    stack = sqlite_stack
    leaving = stack.worker("leaving", concurrency=1)
    ids = stack.publish("work", 4, kwargs={"seconds": 3, "label": "prefetched"})
    wait_for(
        lambda: (
            TaskQueue.objects.using(stack.alias)
            .filter(task_id__in=ids, claimed_by__worker_id=stack.node("leaving"))
            .exclude(status="queued")
            .count()
            == 4
        ),
        60,
        what="all four tasks to be held by the leaving worker",
    )
    leaving.signal(signal.SIGTERM)
    assert leaving.popen.wait(60) == 0
    stack.worker("staying", concurrency=2)
    wait_for(
        lambda: Effect.objects.using(stack.alias).filter(task_id__in=ids).count() == 4,
        60,
        what="every task to run",
    )
    time.sleep(3)
    runs = Effect.objects.using(stack.alias).filter(task_id__in=ids).values_list("runs", flat=True)
    assert sorted(runs) == [1, 1, 1, 1]
    rows = TaskQueue.objects.using(stack.alias).filter(task_id__in=ids)
    assert set(rows.values_list("status", flat=True)) == {"succeeded"}


def queued_in_broker(stack: Stack) -> int:
    """Messages still in the stack's queue (not fetched by any worker)."""
    from kombu import Connection

    with Connection(stack.broker_url) as conn:
        return int(
            conn.default_channel.queue_declare(queue=stack.queue, passive=True).message_count
        )


def test_messages_held_by_the_gate_widen_the_prefetch_window_up_to_a_bound(
    pg_stack: Stack,
) -> None:
    """While the database does not answer, the gate holds what the worker receives: the
    consumer goes on fetching beyond its prefetch count (2 x 4 = 8) while the gate holds
    messages, but never more than twice that; once the database answers, all run once."""
    from tests.integration.harness import database_address, database_url
    from tests.integration.tcp_proxy import TcpProxy

    stack = pg_stack
    host, port = database_address(stack.alias)
    with TcpProxy(host, port) as proxy:
        url = database_url(stack.alias, port=proxy.port)
        stack.worker("window", concurrency=2, DATABASE_URL=url)
        first = stack.publish("work", 1, kwargs={"seconds": 0, "label": "window"})
        wait_for(
            lambda: Effect.objects.using(stack.alias).filter(task_id__in=first).exists(),
            60,
            what="the first task (the loop writer connected)",
        )
        proxy.pause()  # the claims' statement goes out and no answer comes back
        ids = stack.publish("work", 40, kwargs={"seconds": 0, "label": "window"})
        wait_for(lambda: queued_in_broker(stack) <= 40 - 16, 30, what="the worker to fetch 16")
        time.sleep(3)  # would it take more?
        taken = 40 - queued_in_broker(stack)
        assert taken == 16, f"the worker took {taken} messages (prefetch count 8, bound 8 more)"
        assert not Effect.objects.using(stack.alias).filter(task_id__in=ids).exists()
        proxy.restore()
        wait_for(
            lambda: Effect.objects.using(stack.alias).filter(task_id__in=ids).count() == 40,
            60,
            what="all 40 tasks to take effect",
        )
    time.sleep(2)
    runs = dict(
        Effect.objects.using(stack.alias).filter(task_id__in=ids).values_list("task_id", "runs")
    )
    assert {task_id: n for task_id, n in runs.items() if n != 1} == {}

"""worker_health.completions: the end of a run is written behind it, conditional on its token."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import OperationalError

from tests.factories import make_worker
from worker_health import completions, dbthread
from worker_health.completions import Completion
from worker_health.models import EventKind, TaskQueue, WorkerEvent, WorkerRegistry
from worker_health.signals import stale_completion

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def fresh_queue() -> Iterator[None]:
    completions._reset_after_fork()
    yield
    completions._reset_after_fork()


def claim(worker: WorkerRegistry, *task_ids: str) -> None:
    from tests.factories import delivery

    TaskQueue.objects.claim_received(
        [delivery(t) for t in task_ids], worker_pk=worker.pk, incarnation=worker.incarnation
    )


def done(task_id: str, token: int, status: str = "succeeded") -> Completion:
    return Completion(task_id=task_id, token=token, status=status, state="X", worker_id="w")


def test_completions_are_written_together_on_the_database_thread() -> None:
    worker = make_worker("default")
    claim(worker, "a", "b")
    completions.add(done("a", 1))
    completions.add(done("b", 1, "failed"))
    completions.flush(timeout=10)
    assert completions.pending() == []
    assert dict(TaskQueue.objects.values_list("task_id", "status")) == {
        "a": "succeeded",
        "b": "failed",
    }


def test_a_stale_completion_changes_nothing_and_is_recorded() -> None:
    dead = make_worker("default", "dead@host")
    live = make_worker("default", "live@host")
    claim(dead, "t1")
    WorkerRegistry.objects.filter(pk=dead.pk).update(status="failed")
    claim(live, "t1")  # reclaimed: token 2
    seen: list[dict[str, Any]] = []

    def receiver(**kwargs: Any) -> None:
        seen.append(kwargs)

    stale_completion.connect(receiver, weak=False, dispatch_uid="test.stale")
    try:
        completions.add(done("t1", 1))
        completions.flush(timeout=10)
    finally:
        stale_completion.disconnect(dispatch_uid="test.stale")
    assert TaskQueue.objects.get(task_id="t1").status == "claimed"
    event = WorkerEvent.objects.get(kind=EventKind.STALE_COMPLETION)
    assert (event.task_id, event.details["token"]) == ("t1", 1)
    assert [(s["task_id"], s["token"]) for s in seen] == [("t1", 1)]


def test_a_completion_that_cannot_be_written_is_kept_and_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = make_worker("default")
    claim(worker, "t1")
    real = TaskQueue.objects.finish_many
    calls: list[int] = []

    def failing(runs: Any) -> Any:
        calls.append(len(runs))
        if len(calls) == 1:
            raise OperationalError("the database is down")
        return real(runs)

    monkeypatch.setattr(completions, "RETRY_FIRST", 0.05)
    completions._retry = 0.05
    monkeypatch.setattr(type(TaskQueue.objects), "finish_many", lambda self, runs: failing(runs))
    completions.add(done("t1", 1))
    dbthread.call(lambda: None)  # the first try has run (and failed)
    assert calls == [1]
    assert [c.task_id for c in completions.pending()] == ["t1"]
    import time

    deadline = time.monotonic() + 10
    while completions.pending() and time.monotonic() < deadline:
        time.sleep(0.02)
    dbthread.call(lambda: None)
    assert calls == [1, 1]
    assert TaskQueue.objects.get(task_id="t1").status == "succeeded"


def test_an_untracked_run_finishes_its_row_unless_someone_claimed_it() -> None:
    from tests.factories import make_task

    worker = make_worker("default")
    make_task("default", "lone", status="queued")
    make_task("default", "taken", status="queued")
    claim(worker, "taken")
    completions.add(done("lone", -1))
    completions.add(done("taken", -1, "failed"))
    completions.flush(timeout=10)
    statuses = dict(TaskQueue.objects.values_list("task_id", "status"))
    assert statuses == {"lone": "succeeded", "taken": "claimed"}
    assert not WorkerEvent.objects.filter(kind=EventKind.STALE_COMPLETION).exists()


def test_completions_are_retried_when_even_connecting_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database down before the write starts (no connection at all): the queue must
    not stall until the process exits."""
    import time

    worker = make_worker("default")
    claim(worker, "t1")
    attempts: list[int] = []

    def relax_fails_once() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise OperationalError("connection refused")

    monkeypatch.setattr(completions, "relax_connection", relax_fails_once)
    completions._retry = 0.05
    completions.add(done("t1", 1))
    deadline = time.monotonic() + 10
    while completions.pending() or len(attempts) < 2:
        assert time.monotonic() < deadline, "the completion was never retried"
        time.sleep(0.02)
    dbthread.call(lambda: None)
    assert TaskQueue.objects.get(task_id="t1").status == "succeeded"

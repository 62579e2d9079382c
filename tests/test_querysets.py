"""worker_health.querysets: every state transition, judged by the database's clock.

Each test runs on SQLite and, when WORKER_HEALTH_TEST_DATABASE_URL is set, on PostgreSQL:
the clock arithmetic is SQL and differs between the two.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.db import DatabaseError, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tests.factories import (
    ALIASES,
    claimed_task,
    delivery,
    make_task,
    make_worker,
)
from worker_health.models import DetectorState, EventKind, TaskQueue, WorkerEvent, WorkerRegistry
from worker_health.querysets import CLAIMER_FAILED, db_now_minus

pytestmark = pytest.mark.django_db(databases="__all__")

#: the PostgreSQL alias alone (skipped, with the reason, without WORKER_HEALTH_TEST_DATABASE_URL)
POSTGRES_ONLY = [param for param in ALIASES if param.id == "postgres"]


@pytest.fixture(params=ALIASES)
def alias(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --------------------------------------------------------------------------------------------
# WorkerQuerySet


def test_register_inserts_an_active_row_with_a_database_heartbeat(alias: str) -> None:
    incarnation = uuid.uuid4()
    registration = WorkerRegistry.objects.using(alias).register(
        "w1@host", incarnation=incarnation, metadata={"pid": 1}, clock_skew=0.5
    )
    worker = WorkerRegistry.objects.using(alias).get(worker_id="w1@host")
    assert registration.worker.pk == worker.pk
    assert registration.previous_incarnation is None
    assert registration.previous_status is None
    assert worker.status == "active"
    assert worker.incarnation == incarnation
    assert worker.metadata == {"pid": 1}
    assert worker.clock_skew == 0.5
    assert worker.last_heartbeat is not None
    assert worker.started_at is not None
    # written with the database's clock: fresh by the database's own comparison
    assert not WorkerRegistry.objects.using(alias).stale(60).exists()


def test_register_again_with_the_same_incarnation_is_not_a_restart(alias: str) -> None:
    incarnation = uuid.uuid4()
    qs = WorkerRegistry.objects.using(alias)
    qs.register("w1@host", incarnation=incarnation, metadata={})
    again = qs.register("w1@host", incarnation=incarnation, metadata={})
    assert again.previous_incarnation is None
    assert qs.count() == 1


def test_register_a_new_incarnation_takes_over_the_row(alias: str) -> None:
    old = make_worker(alias, "w1@host", status="failed", heartbeat_age=500)
    WorkerRegistry.objects.using(alias).filter(pk=old.pk).update(tasks_processed=42)
    new_incarnation = uuid.uuid4()
    registration = WorkerRegistry.objects.using(alias).register(
        "w1@host", incarnation=new_incarnation, metadata={"pid": 2}
    )
    assert registration.previous_incarnation == old.incarnation
    assert registration.previous_status == "failed"
    worker = WorkerRegistry.objects.using(alias).get(pk=old.pk)  # same row, taken over
    assert worker.status == "active"
    assert worker.incarnation == new_incarnation
    assert worker.tasks_processed == 0
    assert worker.metadata == {"pid": 2}
    assert not WorkerRegistry.objects.using(alias).stale(60).exists()
    assert WorkerRegistry.objects.using(alias).count() == 1


def test_beat_writes_the_heartbeat_and_the_counter(alias: str) -> None:
    worker = make_worker(alias, heartbeat_age=300)
    assert WorkerRegistry.objects.using(alias).stale(60).filter(pk=worker.pk).exists()
    assert WorkerRegistry.objects.using(alias).beat(worker.worker_id, worker.incarnation, 7).written
    worker.refresh_from_db(using=alias)
    assert worker.tasks_processed == 7
    assert not WorkerRegistry.objects.using(alias).stale(60).filter(pk=worker.pk).exists()


def test_beat_of_another_incarnation_or_a_failed_worker_writes_nothing(alias: str) -> None:
    worker = make_worker(alias, heartbeat_age=300)
    qs = WorkerRegistry.objects.using(alias)
    assert qs.beat(worker.worker_id, uuid.uuid4(), 1).written is False
    qs.filter(pk=worker.pk).update(status="failed")
    assert qs.beat(worker.worker_id, worker.incarnation, 1).written is False
    worker.refresh_from_db(using=alias)
    assert worker.tasks_processed == 0
    assert worker.status == "failed"
    # the heartbeat stayed old
    assert qs.filter(pk=worker.pk, last_heartbeat__lt=db_now_minus(200)).exists()


def test_recover_makes_a_failed_worker_active_again(alias: str) -> None:
    worker = make_worker(alias, status="failed", heartbeat_age=300)
    qs = WorkerRegistry.objects.using(alias)
    recovered = qs.recover(worker.worker_id, worker.incarnation, 3)
    assert recovered is not None and recovered.pk == worker.pk
    worker.refresh_from_db(using=alias)
    assert worker.status == "active"
    assert worker.tasks_processed == 3
    assert not qs.stale(60).exists()
    # its event, written with it
    events = WorkerEvent.objects.using(alias).filter(kind=EventKind.WORKER_RECOVERED)
    assert [(e.worker_id, e.details) for e in events] == [
        (worker.pk, {"previous_status": "failed"})
    ]
    # already active: nothing to recover
    assert qs.recover(worker.worker_id, worker.incarnation, 4) is None
    assert events.count() == 1


def test_a_recovery_and_its_event_are_one_transaction(
    alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that comes back is never silently active: if its event cannot be written,
    its row stays failed."""
    from worker_health import models

    worker = make_worker(alias, status="failed", heartbeat_age=300)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise DatabaseError("the event's insert failed")

    monkeypatch.setattr(models, "event", broken)
    with pytest.raises(DatabaseError):
        WorkerRegistry.objects.using(alias).recover(worker.worker_id, worker.incarnation, 3)
    worker.refresh_from_db(using=alias)
    assert worker.status == "failed"


def test_recover_ignores_another_incarnation(alias: str) -> None:
    worker = make_worker(alias, status="offline")
    assert WorkerRegistry.objects.using(alias).recover(worker.worker_id, uuid.uuid4(), 0) is None
    worker.refresh_from_db(using=alias)
    assert worker.status == "offline"


def test_mark_offline(alias: str) -> None:
    worker = make_worker(alias)
    qs = WorkerRegistry.objects.using(alias)
    assert qs.mark_offline(worker.worker_id, uuid.uuid4()) == 0  # not our incarnation
    assert qs.get(pk=worker.pk).status == "active"
    assert qs.mark_offline(worker.worker_id, worker.incarnation) == 1
    assert qs.get(pk=worker.pk).status == "offline"
    assert qs.mark_offline(worker.worker_id) == 0  # already offline
    other = make_worker(alias, "w2@host")
    assert qs.mark_offline(other.worker_id) == 1  # an operator's drain: any incarnation


def test_stale_uses_the_heartbeat_age_by_the_database_clock(alias: str) -> None:
    old = make_worker(alias, "old@host", heartbeat_age=120)
    make_worker(alias, "fresh@host", heartbeat_age=10)
    make_worker(alias, "failed@host", status="failed", heartbeat_age=900)
    make_worker(alias, "offline@host", status="offline", heartbeat_age=900)
    qs = WorkerRegistry.objects.using(alias)
    assert list(qs.stale(60).values_list("worker_id", flat=True)) == [old.worker_id]
    assert set(qs.stale(5).values_list("worker_id", flat=True)) == {"old@host", "fresh@host"}
    assert not qs.stale(300).exists()


def test_stale_with_an_explicit_old_timestamp(alias: str) -> None:
    worker = make_worker(alias)
    qs = WorkerRegistry.objects.using(alias)
    qs.filter(pk=worker.pk).update(last_heartbeat=timezone.now() - timedelta(hours=1))
    assert qs.stale(60).filter(pk=worker.pk).exists()
    assert not qs.stale(7200).filter(pk=worker.pk).exists()


def test_stale_sub_second(alias: str) -> None:
    worker = make_worker(alias, heartbeat_age=1.5)
    qs = WorkerRegistry.objects.using(alias)
    assert qs.stale(0.5).filter(pk=worker.pk).exists()
    assert not qs.stale(30).filter(pk=worker.pk).exists()


def test_fail_if_stale_fails_once(alias: str) -> None:
    worker = make_worker(alias, heartbeat_age=120)
    qs = WorkerRegistry.objects.using(alias)
    assert qs.fail_if_stale(worker.pk, 60) is True
    worker.refresh_from_db(using=alias)
    assert worker.status == "failed"
    assert worker.status_changed_at is not None
    assert qs.fail_if_stale(worker.pk, 60) is False


def test_fail_if_stale_spares_a_fresh_worker(alias: str) -> None:
    worker = make_worker(alias, heartbeat_age=30)
    qs = WorkerRegistry.objects.using(alias)
    assert qs.fail_if_stale(worker.pk, 60) is False
    assert qs.get(pk=worker.pk).status == "active"


def test_fail_if_stale_loses_to_a_heartbeat_written_in_between(alias: str) -> None:
    worker = make_worker(alias, heartbeat_age=120)
    qs = WorkerRegistry.objects.using(alias)
    candidates = list(qs.stale(60).values_list("pk", flat=True))
    assert candidates == [worker.pk]
    qs.beat(worker.worker_id, worker.incarnation, 1)  # the worker beats after the SELECT
    assert qs.fail_if_stale(worker.pk, 60) is False
    assert qs.get(pk=worker.pk).status == "active"


def test_a_heartbeat_says_whether_a_sweep_is_due(alias: str) -> None:
    """On PostgreSQL the heartbeat's statement also reads the detector's last sweep, so
    that a worker tries the sweep's lease only when one is due: with many workers most of
    their statements were lost attempts (H2 in docs/benchmarks.md)."""
    workers = WorkerRegistry.objects.using(alias)
    worker = make_worker(alias, "beat@host")
    detector = DetectorState.objects.using(alias)
    first = workers.beat(worker.worker_id, worker.incarnation, 5, sweep_spacing=30)
    assert first.written and first.sweep_due  # no detector state yet
    assert DetectorState.objects.db_manager(alias).take_sweep_lease(
        "other@host", 30, 60, force=True
    )
    with CaptureQueriesContext(connections[alias]) as queries:
        beat = workers.beat(worker.worker_id, worker.incarnation, 6, sweep_spacing=30)
    assert beat.written
    assert workers.get(pk=worker.pk).tasks_processed == 6
    if alias == "postgres":
        assert len(queries) == 1
        assert beat.sweep_due is False  # swept just now by another worker
        detector.filter(pk=1).update(last_sweep_at=db_now_minus(31))
        assert workers.beat(worker.worker_id, worker.incarnation, 7, sweep_spacing=30).sweep_due
    else:
        assert beat.sweep_due  # SQLite: the lease decides
    workers.filter(pk=worker.pk).update(status="failed")
    assert not workers.beat(worker.worker_id, worker.incarnation, 8, sweep_spacing=30).written


def test_delete_inactive_older_than(alias: str) -> None:
    qs = WorkerRegistry.objects.using(alias)
    gone = make_worker(alias, "gone@host", status="offline")
    recent = make_worker(alias, "recent@host", status="failed")
    active = make_worker(alias, "active@host")
    qs.filter(pk__in=[gone.pk, active.pk]).update(status_changed_at=db_now_minus(3 * 86400))
    assert qs.delete_inactive_older_than(2) == 1
    assert set(qs.values_list("worker_id", flat=True)) == {recent.worker_id, active.worker_id}


def test_deleting_workers_clears_their_tasks_claimed_by_and_has_no_constraint_to_check(
    alias: str,
) -> None:
    """With a million task rows the foreign key's check scanned the table once per deleted
    worker (8 s for 20 workers): the admin's "delete old workers" on 10,000 would run for an
    hour. There is no constraint; Django's SET_NULL clears the references itself."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, "task_queue")
    assert not [
        name
        for name, c in constraints.items()
        if c["foreign_key"] and c["columns"] == ["claimed_by_id"]
    ], constraints
    gone = make_worker(alias, "gone@host", status="offline")
    claimed = claimed_task(alias, "t1", gone)
    TaskQueue.objects.using(alias).filter(pk=claimed.pk).update(status="succeeded")
    qs = WorkerRegistry.objects.using(alias)
    qs.filter(pk=gone.pk).update(status_changed_at=db_now_minus(3 * 86400))
    assert qs.delete_inactive_older_than(2) == 1
    task = TaskQueue.objects.using(alias).get(task_id="t1")
    assert task.claimed_by_id is None
    assert task.claimed_by is None


# --------------------------------------------------------------------------------------------
# TaskQuerySet.claim / finish / requeue_own


def claim(alias: str, task_id: str, worker: WorkerRegistry) -> int | None:
    return TaskQueue.objects.using(alias).claim(
        task_id=task_id,
        task_name="demo.tasks.work",
        queue="celery",
        worker_pk=worker.pk,
        incarnation=worker.incarnation,
    )


def test_claim_of_an_unknown_task_creates_the_row(alias: str) -> None:
    worker = make_worker(alias)
    assert claim(alias, "t1", worker) == 1
    task = TaskQueue.objects.using(alias).get(task_id="t1")
    assert task.status == "claimed"
    assert task.claimed_by_id == worker.pk
    assert task.claimed_incarnation == worker.incarnation
    assert task.fencing_token == 1
    assert task.claimed_at is not None


@pytest.mark.parametrize("status", ["queued", "reserved", "reclaiming"])
def test_claim_of_a_claimable_row(alias: str, status: str) -> None:
    worker = make_worker(alias)
    make_task(alias, "t1", status=status, fencing_token=4, reclaim_lease=uuid.uuid4())
    assert claim(alias, "t1", worker) == 5
    task = TaskQueue.objects.using(alias).get(task_id="t1")
    assert (task.status, task.claimed_by_id, task.fencing_token) == ("claimed", worker.pk, 5)
    assert task.reclaim_lease is None


def test_fencing_token_increases_with_every_claim(alias: str) -> None:
    worker = make_worker(alias)
    tokens = []
    for _ in range(3):
        token = claim(alias, "t1", worker)
        assert token is not None
        tokens.append(token)
        assert TaskQueue.objects.using(alias).requeue_own("t1", token)
    assert tokens == [1, 2, 3]


def test_duplicate_claim_while_the_holder_is_alive_returns_none(alias: str) -> None:
    holder = make_worker(alias, "holder@host")
    other = make_worker(alias, "other@host")
    assert claim(alias, "t1", holder) == 1
    assert claim(alias, "t1", other) is None
    assert claim(alias, "t1", holder) is None  # a redelivery to the holder itself
    task = TaskQueue.objects.using(alias).get(task_id="t1")
    assert (task.claimed_by_id, task.fencing_token) == (holder.pk, 1)


def test_claim_of_a_task_held_by_a_failed_worker_succeeds(alias: str) -> None:
    dead = make_worker(alias, "dead@host")
    live = make_worker(alias, "live@host")
    assert claim(alias, "t1", dead) == 1
    WorkerRegistry.objects.using(alias).filter(pk=dead.pk).update(status="failed")
    assert claim(alias, "t1", live) == 2
    task = TaskQueue.objects.using(alias).get(task_id="t1")
    assert (task.claimed_by_id, task.claimed_incarnation) == (live.pk, live.incarnation)


def test_claim_of_a_task_held_by_an_old_incarnation_succeeds(alias: str) -> None:
    worker = make_worker(alias, "w1@host")
    assert claim(alias, "t1", worker) == 1
    restarted = (
        WorkerRegistry.objects.using(alias)
        .register("w1@host", incarnation=uuid.uuid4(), metadata={})
        .worker
    )
    assert claim(alias, "t1", restarted) == 2
    task = TaskQueue.objects.using(alias).get(task_id="t1")
    assert task.claimed_incarnation == restarted.incarnation


@pytest.mark.parametrize("status", ["succeeded", "failed", "revoked", "quarantined"])
def test_claim_of_a_finished_task_returns_none(alias: str, status: str) -> None:
    worker = make_worker(alias)
    make_task(alias, "t1", status=status, fencing_token=2)
    assert claim(alias, "t1", worker) is None
    task = TaskQueue.objects.using(alias).get(task_id="t1")
    assert (task.status, task.fencing_token, task.claimed_by_id) == (status, 2, None)


def test_finish_only_with_the_current_token(alias: str) -> None:
    dead = make_worker(alias, "dead@host")
    live = make_worker(alias, "live@host")
    old_token = claim(alias, "t1", dead)
    assert old_token == 1
    WorkerRegistry.objects.using(alias).filter(pk=dead.pk).update(status="failed")
    new_token = claim(alias, "t1", live)
    assert new_token == 2
    qs = TaskQueue.objects.using(alias)
    assert qs.finish("t1", old_token, "succeeded") is False  # the cut-off run is fenced off
    assert qs.get(task_id="t1").status == "claimed"
    assert qs.finish("t1", new_token, "failed") is True
    task = qs.get(task_id="t1")
    assert task.status == "failed"
    assert task.finished_at is not None
    assert qs.finish("t1", new_token, "succeeded") is False  # finished once only


def test_requeue_own(alias: str) -> None:
    worker = make_worker(alias)
    token = claim(alias, "t1", worker)
    assert token == 1
    qs = TaskQueue.objects.using(alias)
    assert qs.requeue_own("t1", token + 1) is False
    assert qs.get(task_id="t1").status == "claimed"
    assert qs.requeue_own("t1", token) is True
    task = qs.get(task_id="t1")
    assert (task.status, task.claimed_by_id, task.claimed_incarnation) == ("queued", None, None)
    assert task.fencing_token == 1
    assert qs.requeue_own("t1", token) is False  # not claimed any more


# --------------------------------------------------------------------------------------------
# reserve, mark_revoked, record_published


def test_reserve_stores_the_messages_and_the_hold_in_two_statements(alias: str) -> None:
    worker = make_worker(alias)
    deliveries = [delivery(f"t{i}", body=f"body-{i}".encode()) for i in range(3)]
    with CaptureQueriesContext(connections[alias]) as ctx:
        TaskQueue.objects.using(alias).reserve(deliveries, worker.pk, worker.incarnation)
    statements = [
        q["sql"]
        for q in ctx.captured_queries
        if not q["sql"].upper().startswith(("SAVEPOINT", "RELEASE"))
    ]
    assert len(statements) == 2, statements
    rows = TaskQueue.objects.using(alias).order_by("task_id")
    assert [(r.task_id, r.status, r.claimed_by_id) for r in rows] == [
        (f"t{i}", "reserved", worker.pk) for i in range(3)
    ]
    first = rows[0]
    assert bytes(first.body) == b"body-0"
    assert first.claimed_incarnation == worker.incarnation
    assert first.headers == {"id": "t0", "task": "demo.tasks.work"}
    assert first.properties == {"correlation_id": "t0", "delivery_mode": 2}
    assert first.content_type == "application/json"


def test_reserve_nothing_runs_no_query(alias: str) -> None:
    worker = make_worker(alias)
    with CaptureQueriesContext(connections[alias]) as ctx:
        TaskQueue.objects.using(alias).reserve([], worker.pk, worker.incarnation)
    assert ctx.captured_queries == []


def test_reserve_updates_the_message_but_not_a_running_or_finished_task(alias: str) -> None:
    holder = make_worker(alias, "holder@host")
    other = make_worker(alias, "other@host")
    claimed_task(alias, "running", holder)
    make_task(alias, "done", status="succeeded")
    make_task(alias, "published", status="queued", body=None)  # publisher's row: no body
    make_task(alias, "lost", status="reclaiming", reclaim_lease=uuid.uuid4())
    TaskQueue.objects.using(alias).reserve(
        [
            delivery("running", body=b"v2"),
            delivery("done", body=b"v2"),
            delivery("published", body=b"v2"),
            delivery("lost", body=b"v2"),
        ],
        other.pk,
        other.incarnation,
    )
    qs = TaskQueue.objects.using(alias)
    running = qs.get(task_id="running")
    assert (running.status, running.claimed_by_id) == ("claimed", holder.pk)
    assert qs.get(task_id="done").status == "succeeded"
    published = qs.get(task_id="published")
    assert (published.status, published.claimed_by_id) == ("reserved", other.pk)
    assert bytes(published.body) == b"v2"  # the latest delivery is the one to publish again
    lost = qs.get(task_id="lost")
    assert (lost.status, lost.claimed_by_id, lost.reclaim_lease) == ("reserved", other.pk, None)


def test_record_published_does_not_overwrite_a_workers_row(alias: str) -> None:
    worker = make_worker(alias)
    qs = TaskQueue.objects.using(alias)
    qs.record_published(task_id="new", task_name="a.b", queue="q", eta=None, expires=None)
    new = qs.get(task_id="new")
    assert (new.status, new.task_name, new.queue, new.routing_key) == ("queued", "a.b", "q", "q")
    claimed_task(alias, "t1", worker)
    qs.record_published(task_id="t1", task_name="x", queue="other", eta=None, expires=None)
    task = qs.get(task_id="t1")
    assert (task.status, task.task_name, task.queue) == ("claimed", "demo.tasks.work", "celery")


def test_mark_revoked(alias: str) -> None:
    worker = make_worker(alias)
    for status in ("queued", "reserved", "succeeded", "failed", "quarantined"):
        make_task(alias, status, status=status)
    claimed_task(alias, "claimed", worker)
    qs = TaskQueue.objects.using(alias)
    ids = ["queued", "reserved", "claimed", "succeeded", "failed", "quarantined", "unknown"]
    assert qs.mark_revoked(ids) == 3
    assert dict(qs.values_list("task_id", "status")) == {
        "queued": "revoked",
        "reserved": "revoked",
        "claimed": "revoked",
        "succeeded": "succeeded",
        "failed": "failed",
        "quarantined": "quarantined",
    }
    assert qs.filter(status="revoked", finished_at__isnull=False).count() == 3


def test_mark_revoked_accepts_a_generator(alias: str) -> None:
    make_task(alias, "t1")
    assert TaskQueue.objects.using(alias).mark_revoked(t for t in ["t1"]) == 1


def test_held_by_and_orphaned(alias: str) -> None:
    alive = make_worker(alias, "alive@host")
    dead = make_worker(alias, "dead@host")
    claimed_task(alias, "a", alive)
    claimed_task(alias, "d", dead)
    make_task(alias, "q")
    qs = TaskQueue.objects.using(alias)
    assert list(qs.held_by(alive).values_list("task_id", flat=True)) == ["a"]
    assert not qs.orphaned().exists()
    WorkerRegistry.objects.using(alias).filter(pk=dead.pk).update(status="failed")
    assert list(qs.orphaned().values_list("task_id", flat=True)) == ["d"]
    # an old incarnation of a live name is an orphan too
    WorkerRegistry.objects.using(alias).register(
        "alive@host", incarnation=uuid.uuid4(), metadata={}
    )
    assert set(qs.orphaned().values_list("task_id", flat=True)) == {"a", "d"}


def test_requeue_quarantined(alias: str) -> None:
    make_task(alias, "q1", status="quarantined", reclaim_count=3, finished_at=timezone.now())
    make_task(alias, "s1", status="succeeded")
    qs = TaskQueue.objects.using(alias)
    pks = list(qs.values_list("pk", flat=True))
    assert qs.requeue_quarantined(pks) == [str(qs.get(task_id="q1").pk)]
    task = qs.get(task_id="q1")
    assert (task.status, task.reclaim_count, task.finished_at) == ("reclaiming", 0, None)
    assert qs.get(task_id="s1").status == "succeeded"


# --------------------------------------------------------------------------------------------
# retention


def test_delete_finished_in_batches(alias: str) -> None:
    old = db_now_minus(10 * 86400)
    for i in range(7):
        make_task(alias, f"old{i}", status=("succeeded", "failed", "revoked", "quarantined")[i % 4])
    make_task(alias, "recent", status="succeeded")
    make_task(alias, "held", status="reserved")
    make_task(alias, "queued", status="queued")
    qs = TaskQueue.objects.using(alias)
    qs.filter(task_id__startswith="old").update(finished_at=old)
    qs.filter(task_id__in=["held", "queued"]).update(finished_at=old)  # not finished: kept
    qs.filter(task_id="recent").update(finished_at=db_now_minus(3600))
    with CaptureQueriesContext(connections[alias]) as ctx:
        deleted = qs.delete_finished(timedelta(days=7), batch_size=3)
    assert deleted == 7
    deletes = [q for q in ctx.captured_queries if q["sql"].upper().startswith("DELETE")]
    assert len(deletes) == 3  # 3 + 3 + 1
    assert set(qs.values_list("task_id", flat=True)) == {"recent", "held", "queued"}
    assert qs.delete_finished(timedelta(days=7), batch_size=3) == 0


def test_delete_finished_keeps_rows_without_finished_at(alias: str) -> None:
    make_task(alias, "t1", status="succeeded", finished_at=None)
    assert TaskQueue.objects.using(alias).delete_finished(timedelta(seconds=1)) == 0


def test_events_delete_older_than(alias: str) -> None:
    events = WorkerEvent.objects.using(alias)
    for i in range(5):
        events.create(kind="worker_failed", worker_name=f"w{i}")
    events.filter(worker_name__in=["w0", "w1", "w2"]).update(created_at=db_now_minus(9 * 86400))
    assert events.delete_older_than(timedelta(days=7), batch_size=2) == 3
    assert sorted(events.values_list("worker_name", flat=True)) == ["w3", "w4"]


# --------------------------------------------------------------------------------------------
# DetectorStateManager


def detector(alias: str) -> DetectorState:
    return DetectorState.objects.using(alias).get(pk=1)


def set_detector(alias: str, *, last_sweep_age: float, observing_age: float) -> None:
    DetectorState.objects.using(alias).filter(pk=1).update(
        last_sweep_at=db_now_minus(last_sweep_age), observing_since=db_now_minus(observing_age)
    )


def test_first_sweep_lease_creates_the_row(alias: str) -> None:
    manager = DetectorState.objects.db_manager(alias)
    assert manager.take_sweep_lease("d1", spacing=10, outage_gap=60, force=False) is True
    state = detector(alias)
    assert state.last_sweep_by == "d1"
    assert state.last_sweep_at is not None
    assert state.observing_since is not None
    assert not manager.observed_for(60)  # just started watching


def test_sweep_lease_respects_spacing(alias: str) -> None:
    manager = DetectorState.objects.db_manager(alias)
    assert manager.take_sweep_lease("d1", spacing=10, outage_gap=60, force=False)
    assert manager.take_sweep_lease("d2", spacing=10, outage_gap=60, force=False) is False
    assert detector(alias).last_sweep_by == "d1"
    set_detector(alias, last_sweep_age=11, observing_age=100)
    assert manager.take_sweep_lease("d2", spacing=10, outage_gap=60, force=False) is True
    assert detector(alias).last_sweep_by == "d2"
    assert manager.take_sweep_lease("d3", spacing=10, outage_gap=60, force=False) is False


def test_sweep_lease_force_ignores_spacing(alias: str) -> None:
    manager = DetectorState.objects.db_manager(alias)
    assert manager.take_sweep_lease("d1", spacing=10, outage_gap=60, force=False)
    assert manager.take_sweep_lease("d2", spacing=10, outage_gap=60, force=True) is True
    assert detector(alias).last_sweep_by == "d2"


def test_sweeps_without_a_gap_keep_observing_since(alias: str) -> None:
    manager = DetectorState.objects.db_manager(alias)
    manager.take_sweep_lease("d1", spacing=10, outage_gap=60, force=False)
    set_detector(alias, last_sweep_age=30, observing_age=500)
    assert manager.take_sweep_lease("d1", spacing=10, outage_gap=60, force=False)
    assert manager.observed_for(400)
    assert not manager.observed_for(600)


def test_a_gap_longer_than_outage_gap_restarts_observation(alias: str) -> None:
    manager = DetectorState.objects.db_manager(alias)
    manager.take_sweep_lease("d1", spacing=10, outage_gap=60, force=False)
    set_detector(alias, last_sweep_age=90, observing_age=500)
    assert manager.observed_for(400)
    assert manager.take_sweep_lease("d1", spacing=10, outage_gap=60, force=False)
    assert not manager.observed_for(1)
    assert not manager.observed_for(60)


def test_forced_sweep_after_a_gap_also_restarts_observation(alias: str) -> None:
    manager = DetectorState.objects.db_manager(alias)
    manager.take_sweep_lease("d1", spacing=10, outage_gap=60, force=False)
    set_detector(alias, last_sweep_age=90, observing_age=500)
    assert manager.take_sweep_lease("d1", spacing=10, outage_gap=60, force=True)
    assert not manager.observed_for(60)


def test_observed_for_without_a_row(alias: str) -> None:
    assert DetectorState.objects.db_manager(alias).observed_for(0.001) is False


def test_record_sweep_done(alias: str) -> None:
    manager = DetectorState.objects.db_manager(alias)
    manager.take_sweep_lease("d1", spacing=10, outage_gap=60, force=False)
    manager.record_sweep_done(0.25)
    state = detector(alias)
    assert state.last_sweep_duration == 0.25
    assert state.last_success_at is not None


def test_claim_racing_with_the_insert_of_a_queued_row_still_claims_it(
    alias: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker_health.querysets import TaskQuerySet

    worker = make_worker(alias)
    original_update = TaskQuerySet.update
    inserted: list[bool] = []

    def update_then_a_concurrent_insert(self: TaskQuerySet, **kwargs: Any) -> int:
        updated = original_update(self, **kwargs)
        if kwargs.get("status") == "claimed" and not updated and not inserted:
            # what the publisher's commit (or the worker's recorder) does right then
            inserted.append(True)
            TaskQueue.objects.using(alias).record_published(
                task_id="t1", task_name="demo.tasks.work", queue="celery", eta=None, expires=None
            )
        return updated

    monkeypatch.setattr(TaskQuerySet, "update", update_then_a_concurrent_insert)
    token = claim(alias, "t1", worker)
    task = TaskQueue.objects.using(alias).get(task_id="t1")
    assert token == 1
    assert (task.status, task.claimed_by_id) == ("claimed", worker.pk)


def test_sweep_lease_truncates_a_long_detector_name(alias: str) -> None:
    manager = DetectorState.objects.db_manager(alias)
    who = "beat@" + "h" * 300
    assert manager.take_sweep_lease(who, spacing=10, outage_gap=60, force=False)
    assert detector(alias).last_sweep_by == who[:255]


@pytest.mark.django_db
def test_a_publish_reopens_a_finished_task_as_a_new_run() -> None:
    """An application that publishes the id of a finished task again gets it run again
    (as Celery would); a revoked id stays revoked."""
    from worker_health.models import TaskQueue

    for task_id, status in (("done", "succeeded"), ("broke", "failed"), ("stopped", "revoked")):
        TaskQueue.objects.create(
            task_id=task_id, task_name="t", status=status, fencing_token=2, reclaim_count=1
        )
    for task_id in ("done", "broke", "stopped", "new"):
        TaskQueue.objects.record_published(
            task_id=task_id, task_name="t", queue="q", eta=None, expires=None
        )
    rows = dict(TaskQueue.objects.values_list("task_id", "status"))
    assert rows == {"done": "queued", "broke": "queued", "stopped": "revoked", "new": "queued"}
    reopened = TaskQueue.objects.get(task_id="done")
    assert reopened.reclaim_count == 0 and reopened.finished_at is None
    assert reopened.fencing_token == 2  # tokens keep increasing across runs


# --------------------------------------------------------------------------------------------
# claim_received / confirm_claim / finish_many (the gate and completions)


def claim_received(alias: str, worker: WorkerRegistry, *task_ids: str) -> dict[str, int | None]:
    return TaskQueue.objects.using(alias).claim_received(
        [delivery(t, body=f"body-{t}".encode()) for t in task_ids],
        worker_pk=worker.pk,
        incarnation=worker.incarnation,
    )


def test_claim_received_stores_unknown_tasks_claimed_with_their_message(alias: str) -> None:
    worker = make_worker(alias)
    assert claim_received(alias, worker, "a", "b") == {"a": 1, "b": 1}
    rows = TaskQueue.objects.using(alias).order_by("task_id")
    assert [(r.task_id, r.status, r.claimed_by_id, r.fencing_token) for r in rows] == [
        ("a", "claimed", worker.pk, 1),
        ("b", "claimed", worker.pk, 1),
    ]
    first = rows[0]
    assert bytes(first.body) == b"body-a"
    assert first.claimed_incarnation == worker.incarnation
    assert first.claimed_at is not None
    assert first.headers == {"id": "a", "task": "demo.tasks.work"}
    assert first.properties == {"correlation_id": "a", "delivery_mode": 2}


@pytest.mark.parametrize("status", ["queued", "reserved", "reclaiming"])
def test_claim_received_takes_a_claimable_row_with_a_new_token(alias: str, status: str) -> None:
    worker = make_worker(alias)
    make_task(alias, "t1", status=status, fencing_token=4, reclaim_lease=uuid.uuid4(), body=None)
    assert claim_received(alias, worker, "t1") == {"t1": 5}
    task = TaskQueue.objects.using(alias).get(task_id="t1")
    assert (task.status, task.claimed_by_id, task.fencing_token) == ("claimed", worker.pk, 5)
    assert task.reclaim_lease is None
    assert bytes(task.body) == b"body-t1"  # the publisher's row gets the message


def test_claim_received_refuses_what_may_not_run(alias: str) -> None:
    holder = make_worker(alias, "holder@host")
    other = make_worker(alias, "other@host")
    claimed_task(alias, "running", holder)
    make_task(alias, "done", status="succeeded", fencing_token=3)
    tokens = claim_received(alias, other, "running", "done", "new")
    assert tokens == {"running": None, "done": None, "new": 1}
    qs = TaskQueue.objects.using(alias)
    running = qs.get(task_id="running")
    assert (running.claimed_by_id, running.fencing_token) == (holder.pk, 1)
    done = qs.get(task_id="done")
    assert (done.status, done.fencing_token, done.claimed_by_id) == ("succeeded", 3, None)
    # a redelivery to the holder itself is refused too
    assert claim_received(alias, holder, "running") == {"running": None}


def test_claim_received_takes_over_from_a_failed_or_replaced_holder(alias: str) -> None:
    dead = make_worker(alias, "dead@host")
    live = make_worker(alias, "live@host")
    assert claim_received(alias, dead, "t1", "t2") == {"t1": 1, "t2": 1}
    WorkerRegistry.objects.using(alias).filter(pk=dead.pk).update(status="failed")
    assert claim_received(alias, live, "t1") == {"t1": 2}
    restarted = (
        WorkerRegistry.objects.using(alias)
        .register("dead@host", incarnation=uuid.uuid4(), metadata={})
        .worker
    )
    assert claim_received(alias, restarted, "t2") == {"t2": 2}


@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_claim_received_of_a_batch_is_one_statement_on_postgresql(alias: str) -> None:
    worker = make_worker(alias)
    make_task(alias, "t1", status="queued")
    with CaptureQueriesContext(connections[alias]) as ctx:
        claim_received(alias, worker, *[f"t{i}" for i in range(1, 9)])
    assert len(ctx.captured_queries) == 1, ctx.captured_queries


def test_claim_received_keeps_binary_bodies_times_and_odd_headers_exactly(alias: str) -> None:
    """The batch travels as one JSON parameter on PostgreSQL: a pickled body (any bytes),
    ETA and expiry, and header values JSON has no type for come through intact."""
    worker = make_worker(alias)
    body = bytes(range(256)) + b"\x00\xff\n\\"
    eta = timezone.now() + timedelta(minutes=5)
    expires = eta + timedelta(hours=1)
    headers = {"id": "p1", "task": "demo.tasks.work", "argsrepr": "('é', \"\\n\")", "n": 1.5}
    assert TaskQueue.objects.using(alias).claim_received(
        [
            delivery(
                "p1",
                body=body,
                content_type="application/x-python-serialize",
                content_encoding="binary",
                eta=eta,
                expires=expires,
                headers=headers,
            ),
            delivery("p2", body=None),
        ],
        worker_pk=worker.pk,
        incarnation=worker.incarnation,
    ) == {"p1": 1, "p2": 1}
    row = TaskQueue.objects.using(alias).get(task_id="p1")
    assert bytes(row.body) == body
    assert (row.content_type, row.content_encoding) == (
        "application/x-python-serialize",
        "binary",
    )
    assert (row.eta, row.expires) == (eta, expires)
    assert row.headers == headers
    assert TaskQueue.objects.using(alias).get(task_id="p2").body is None


@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_hot_path_statements_are_prepared_on_worker_health_connections(alias: str) -> None:
    """Django turns psycopg's prepared statements off by default; worker_health's own
    connections (``relax_connection``) prepare its hot-path statements all the same."""
    from worker_health.durability import relax_connection

    worker = make_worker(alias)
    relax_connection(alias)
    claim_received(alias, worker, "t1")
    TaskQueue.objects.using(alias).finish_many([("t1", 1, "succeeded")])
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [row[0] for row in cursor.fetchall()]
    assert any("INSERT INTO task_queue" in sql for sql in prepared), prepared
    assert any("UPDATE task_queue" in sql for sql in prepared), prepared


@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_prepare_threshold_none_in_options_turns_preparing_off(alias: str) -> None:
    from worker_health.durability import prepares

    options = connections[alias].settings_dict.setdefault("OPTIONS", {})
    assert prepares(alias)
    options["prepare_threshold"] = None
    try:
        assert not prepares(alias)
    finally:
        del options["prepare_threshold"]


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_a_prepared_statement_the_server_forgot_runs_unprepared(alias: str) -> None:
    """Behind a pooler in transaction mode the next server connection does not know the
    statement: the claim still goes through, and nothing is prepared from then on."""
    from worker_health import durability

    worker = make_worker(alias)
    durability.relax_connection(alias)
    assert claim_received(alias, worker, "t1") == {"t1": 1}
    raw = connections[alias].connection
    raw.pgconn.exec_(b"DEALLOCATE ALL")  # behind psycopg's back, as another server would
    try:
        assert claim_received(alias, worker, "t2") == {"t2": 1}
        assert alias in durability.unprepared
        assert claim_received(alias, worker, "t3") == {"t3": 1}
    finally:
        durability.unprepared.discard(alias)


def test_confirm_claim_only_for_the_current_claim(alias: str) -> None:
    worker = make_worker(alias, "w1@host")
    other = make_worker(alias, "w2@host")
    assert claim_received(alias, worker, "t1") == {"t1": 1}
    qs = TaskQueue.objects.using(alias)
    assert qs.get(task_id="t1").started_token is None  # the gate's claim records no start
    assert qs.confirm_claim("t1", 1, worker.pk, worker.incarnation) is True
    assert qs.get(task_id="t1").started_token == 1  # the confirmation does
    assert qs.confirm_claim("t1", 2, worker.pk, worker.incarnation) is False
    assert qs.confirm_claim("t1", 1, other.pk, other.incarnation) is False
    WorkerRegistry.objects.using(alias).filter(pk=worker.pk).update(status="failed")
    assert claim_received(alias, other, "t1") == {"t1": 2}  # reclaimed meanwhile
    assert qs.confirm_claim("t1", 1, worker.pk, worker.incarnation) is False
    assert qs.get(task_id="t1").started_token == 1  # a refused confirmation records nothing
    assert qs.confirm_claim("t1", 2, other.pk, other.incarnation) is True
    assert qs.get(task_id="t1").started_token == 2


def test_a_claim_by_the_pool_process_records_that_its_run_starts(alias: str) -> None:
    """Without a gate (solo, green pools) the claim is made just before the run's code:
    the row says the run started, for a new row and for one the publisher recorded."""
    worker = make_worker(alias, "w1@host")
    qs = TaskQueue.objects.using(alias)
    assert claim(alias, "fresh", worker) == 1
    make_task(alias, "published", status="queued")
    assert claim(alias, "published", worker) == 1
    qs.filter(task_id="published").update(status="queued")  # e.g. a retry
    assert claim(alias, "published", worker) == 2
    rows = dict(qs.values_list("task_id", "started_token"))
    assert rows == {"fresh": 1, "published": 2}


def test_finish_many_accepts_only_current_tokens(alias: str) -> None:
    dead = make_worker(alias, "dead@host")
    live = make_worker(alias, "live@host")
    claim_received(alias, dead, "cut", "done", "failed")
    WorkerRegistry.objects.using(alias).filter(pk=dead.pk).update(status="failed")
    assert claim_received(alias, live, "cut") == {"cut": 2}
    qs = TaskQueue.objects.using(alias)
    accepted = qs.finish_many(
        [("cut", 1, "succeeded"), ("done", 1, "succeeded"), ("failed", 1, "failed")]
    )
    assert accepted == {("done", 1), ("failed", 1)}
    statuses = dict(qs.values_list("task_id", "status"))
    assert statuses == {"cut": "claimed", "done": "succeeded", "failed": "failed"}
    assert qs.get(task_id="done").finished_at is not None
    assert qs.finish_many([("done", 1, "failed")]) == set()  # finished once only
    assert qs.finish_many([]) == set()


def test_claim_and_finish_does_both_as_each_would(alias: str) -> None:
    worker = make_worker(alias)
    claim_received(alias, worker, "done", "cut")
    TaskQueue.objects.using(alias).filter(task_id="cut").update(fencing_token=9)
    tokens, accepted = TaskQueue.objects.using(alias).claim_and_finish(
        [delivery("new"), delivery("done")],
        [("done", 1, "succeeded"), ("cut", 1, "succeeded")],
        worker_pk=worker.pk,
        incarnation=worker.incarnation,
    )
    # "done" finished first, so its new delivery is refused; "cut" was not this run's
    assert tokens == {"new": 1, "done": None}
    assert accepted == {("done", 1)}
    statuses = dict(TaskQueue.objects.using(alias).values_list("task_id", "status"))
    assert statuses == {"done": "succeeded", "cut": "claimed", "new": "claimed"}


def test_a_failed_claimer_claims_nothing_and_is_told_so(alias: str) -> None:
    """K2: a zombie that resumed before its heart noticed it was failed must not take the
    tasks reclaimed from it (they run elsewhere): every delivery of its batch is refused
    with ``CLAIMER_FAILED`` (it goes back to the broker), and nothing of the rows changes;
    its finished runs are still written."""
    zombie = make_worker(alias, "zombie@host")
    claim_received(alias, zombie, "ran")
    make_task(alias, "reclaimed", status="queued", fencing_token=3, body=b"m")
    WorkerRegistry.objects.using(alias).filter(pk=zombie.pk).update(status="failed")
    before = {t.task_id: (t.status, t.fencing_token, t.claimed_by_id) for t in _all(alias)}
    assert claim_received(alias, zombie, "reclaimed", "unknown") == {
        "reclaimed": CLAIMER_FAILED,
        "unknown": CLAIMER_FAILED,
    }
    tokens, accepted = TaskQueue.objects.using(alias).claim_and_finish(
        [delivery("reclaimed")],
        [("ran", 1, "succeeded")],
        worker_pk=zombie.pk,
        incarnation=zombie.incarnation,
    )
    assert tokens == {"reclaimed": CLAIMER_FAILED}
    assert accepted == {("ran", 1)}
    after = {t.task_id: (t.status, t.fencing_token, t.claimed_by_id) for t in _all(alias)}
    assert after == {**before, "ran": ("succeeded", 1, zombie.pk)}
    # another incarnation of the name (a restart) is not this claimer either
    restarted = make_worker(alias, "zombie@host")
    assert claim_received(alias, restarted, "reclaimed") == {"reclaimed": 4}
    assert TaskQueue.objects.using(alias).claim_received(
        [delivery("unknown")], worker_pk=zombie.pk, incarnation=zombie.incarnation
    ) == {"unknown": CLAIMER_FAILED}


def test_a_pool_claim_may_require_a_claimer_that_is_not_failed(alias: str) -> None:
    zombie = make_worker(alias, "zombie@host")
    make_task(alias, "t1", status="queued", fencing_token=2, body=b"m")
    qs = TaskQueue.objects.using(alias)
    WorkerRegistry.objects.using(alias).filter(pk=zombie.pk).update(status="failed")
    fields = {"task_name": "demo.tasks.work", "queue": "celery", "worker_pk": zombie.pk}
    assert (
        qs.claim(task_id="t1", incarnation=zombie.incarnation, require_alive=True, **fields) is None
    )
    assert qs.get(task_id="t1").status == "queued"
    WorkerRegistry.objects.using(alias).filter(pk=zombie.pk).update(status="active")
    assert qs.claim(task_id="t1", incarnation=zombie.incarnation, require_alive=True, **fields) == 3


def _all(alias: str) -> list[TaskQueue]:
    return list(TaskQueue.objects.using(alias).order_by("task_id"))


@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_claim_and_finish_is_one_statement_on_postgresql(alias: str) -> None:
    worker = make_worker(alias)
    claim_received(alias, worker, "a", "b")
    with CaptureQueriesContext(connections[alias]) as ctx:
        tokens, accepted = TaskQueue.objects.using(alias).claim_and_finish(
            [delivery("c"), delivery("d")],
            [("a", 1, "succeeded"), ("b", 1, "failed")],
            worker_pk=worker.pk,
            incarnation=worker.incarnation,
        )
    assert len(ctx.captured_queries) == 1, ctx.captured_queries
    assert tokens == {"c": 1, "d": 1}
    assert accepted == {("a", 1), ("b", 1)}


@pytest.mark.parametrize("status", ["succeeded", "failed"])
def test_record_published_reopens_a_finished_row_but_not_a_revoked_one(
    alias: str, status: str
) -> None:
    worker = make_worker(alias)
    claimed_task(alias, "t1", worker)
    qs = TaskQueue.objects.using(alias)
    qs.filter(task_id="t1").update(status=status, finished_at=timezone.now(), reclaim_count=2)
    make_task(alias, "gone", status="revoked")
    qs.record_published(task_id="t1", task_name="x", queue="q", eta=None, expires=None)
    qs.record_published(task_id="gone", task_name="x", queue="q", eta=None, expires=None)
    task = qs.get(task_id="t1")
    assert (task.status, task.claimed_by_id, task.finished_at, task.reclaim_count) == (
        "queued",
        None,
        None,
        0,
    )
    assert qs.get(task_id="gone").status == "revoked"


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("alias", POSTGRES_ONLY)
def test_record_published_relaxes_only_its_own_commit(alias: str) -> None:
    conn = connections[alias]
    with CaptureQueriesContext(conn) as ctx:
        TaskQueue.objects.using(alias).record_published(
            task_id="t1", task_name="a.b", queue="q", eta=None, expires=None
        )
    assert len(ctx.captured_queries) == 1  # one round trip on the publisher's path
    assert "set_config('synchronous_commit', 'off', true)" in ctx.captured_queries[0]["sql"]
    with conn.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"  # nothing leaks past the statement

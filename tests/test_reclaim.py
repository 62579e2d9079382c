"""worker_health.reclaim in-process: detection, the outage guard, reclamation, quarantine,
the outbox and concurrent reclaimers.

The broker publish is replaced by a recorder here (``worker_health.publish.republish``);
tests/integration/ publishes through real brokers.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import django
import pytest
from django.db import connections, transaction
from django.test.utils import CaptureQueriesContext

from tests.factories import (
    ALIASES,
    age_heartbeat,
    claimed_task,
    delivery,
    make_task,
    make_worker,
    needs_postgres,
    watched_for,
)
from worker_health import publish, reclaim
from worker_health.models import (
    DetectorState,
    EventKind,
    TaskQueue,
    WorkerEvent,
    WorkerRegistry,
)
from worker_health.querysets import db_now_minus
from worker_health.signals import task_quarantined, task_reclaimed, worker_failed

#: pytest-django's ``settings`` fixture (its class was renamed between releases)
SettingsWrapper = Any
CaptureCallbacks = Callable[..., Any]

HEARTBEAT, STALE, CHECK = 10.0, 20.0, 5.0


class Published:
    """Stands in for the broker: records each publish; can be told to fail."""

    def __init__(self) -> None:
        self.task_ids: list[str] = []
        self.fail = False
        self.lock = threading.Lock()

    def __call__(self, task: TaskQueue) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable (test)")
        assert task.body is not None
        with self.lock:
            self.task_ids.append(task.task_id)


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> Published:
    recorder = Published()
    monkeypatch.setattr(publish, "republish", recorder)
    return recorder


@pytest.fixture
def timing(settings: SettingsWrapper) -> SettingsWrapper:
    settings.WORKER_HEALTH_HEARTBEAT_INTERVAL = HEARTBEAT
    settings.WORKER_HEALTH_STALE_AFTER = STALE
    settings.WORKER_HEALTH_CHECK_INTERVAL = CHECK
    settings.WORKER_HEALTH_MAX_RECLAIMS = 3
    return settings


class Received:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, sender: Any, **kwargs: Any) -> None:
        self.calls.append({"sender": sender, **kwargs})


@pytest.fixture
def failed_signal() -> Iterator[Received]:
    receiver = Received()
    worker_failed.connect(receiver, dispatch_uid="test-worker-failed")
    yield receiver
    worker_failed.disconnect(dispatch_uid="test-worker-failed")


@pytest.fixture
def reclaimed_signal() -> Iterator[Received]:
    receiver = Received()
    task_reclaimed.connect(receiver, dispatch_uid="test-task-reclaimed")
    yield receiver
    task_reclaimed.disconnect(dispatch_uid="test-task-reclaimed")


@pytest.fixture
def quarantined_signal() -> Iterator[Received]:
    receiver = Received()
    task_quarantined.connect(receiver, dispatch_uid="test-task-quarantined")
    yield receiver
    task_quarantined.disconnect(dispatch_uid="test-task-quarantined")


def status_of(task_id: str) -> str:
    return TaskQueue.objects.get(task_id=task_id).status


# --------------------------------------------------------------------------------------------
# detection


@pytest.mark.django_db
def test_sweep_fails_a_stale_worker_once(
    timing: SettingsWrapper,
    published: Published,
    failed_signal: Received,
    caplog: pytest.LogCaptureFixture,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    caplog.set_level(logging.WARNING, logger="worker_health")
    watched_for("default", STALE * 2)
    stale = make_worker("default", "stale@host", heartbeat_age=STALE * 3)
    make_worker("default", "fresh@host", heartbeat_age=1)

    with django_capture_on_commit_callbacks(execute=True):
        result = reclaim.sweep("test", force=True)

    assert result.swept
    assert result.failed_workers == ["stale@host"]
    assert WorkerRegistry.objects.get(worker_id="stale@host").status == "failed"
    assert WorkerRegistry.objects.get(worker_id="fresh@host").status == "active"

    (call,) = failed_signal.calls
    assert call["sender"] is WorkerRegistry
    assert call["worker"].worker_id == "stale@host"
    assert call["worker"].pk == stale.pk
    assert call["last_heartbeat"] is not None

    records = [
        r for r in caplog.records if r.name == "worker_health" and "worker_failed" in r.getMessage()
    ]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert records[0].worker_id == "stale@host"  # type: ignore[attr-defined]

    events = WorkerEvent.objects.filter(kind=EventKind.WORKER_FAILED)
    assert [(e.worker_name, e.worker_id) for e in events] == [("stale@host", stale.pk)]

    # a second sweep does not fail it again
    with django_capture_on_commit_callbacks(execute=True):
        again = reclaim.sweep("test", force=True)
    assert again.swept
    assert again.failed_workers == []
    assert len(failed_signal.calls) == 1
    assert WorkerEvent.objects.filter(kind=EventKind.WORKER_FAILED).count() == 1


@pytest.mark.django_db
def test_sweep_respects_the_lease(timing: SettingsWrapper, published: Published) -> None:
    assert reclaim.sweep("a").swept is True
    assert reclaim.sweep("b").swept is False  # within CHECK_INTERVAL
    assert DetectorState.objects.get().last_sweep_by == "a"
    assert reclaim.sweep("c", force=True).swept is True


@pytest.mark.django_db
def test_sweep_records_its_duration(timing: SettingsWrapper, published: Published) -> None:
    reclaim.sweep("a", force=True)
    state = DetectorState.objects.get()
    assert state.last_success_at is not None
    assert state.last_sweep_duration is not None
    assert state.last_sweep_duration >= 0


@pytest.mark.django_db
def test_no_worker_is_failed_before_the_detector_watched_for_stale_after(
    timing: SettingsWrapper, published: Published, failed_signal: Received
) -> None:
    make_worker("default", "stale@host", heartbeat_age=STALE * 10)
    # the first sweep ever: the detector has watched for no time at all
    assert reclaim.sweep("d", force=True).failed_workers == []
    # watched for less than STALE_AFTER, with no gap
    watched_for("default", STALE - 2, last_sweep_age=1)
    assert reclaim.sweep("d", force=True).failed_workers == []
    watched_for("default", STALE + 2, last_sweep_age=1)
    assert reclaim.sweep("d", force=True).failed_workers == ["stale@host"]
    assert len(failed_signal.calls) == 1


@pytest.mark.django_db
def test_outage_guard_after_a_gap_longer_than_stale_after(
    timing: SettingsWrapper, published: Published, failed_signal: Received
) -> None:
    make_worker("default", "stale@host", heartbeat_age=STALE * 10)
    # watching for a long time, but the last sweep was longer ago than STALE_AFTER:
    # the database (or every detector) was away; heartbeats could not be written
    watched_for("default", STALE * 50, last_sweep_age=STALE + 5)
    assert reclaim.sweep("d", force=True).failed_workers == []
    assert WorkerRegistry.objects.get().status == "active"
    # the observation restarted with this sweep
    assert not DetectorState.objects.observed_for(1)


@pytest.mark.django_db
def test_outage_guard_in_real_time(settings: SettingsWrapper, published: Published) -> None:
    """After a pause in sweeps longer than STALE_AFTER, a stale worker is failed only once
    the detector has swept, without a pause, for STALE_AFTER again."""
    stale_after = 0.6
    settings.WORKER_HEALTH_HEARTBEAT_INTERVAL = 0.3
    settings.WORKER_HEALTH_STALE_AFTER = stale_after
    settings.WORKER_HEALTH_CHECK_INTERVAL = 0.1

    def sweep_until_failed(name: str) -> float:
        """Sweep every 0.05 s; return how long after the first sweep ``name`` was failed."""
        start = time.monotonic()
        while time.monotonic() - start < 10:
            if name in reclaim.sweep("d", force=True).failed_workers:
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"{name} was never failed")

    make_worker("default", "first@host", heartbeat_age=3600)
    assert sweep_until_failed("first@host") >= stale_after

    # an outage: nobody sweeps for longer than STALE_AFTER
    make_worker("default", "second@host", heartbeat_age=3600)
    time.sleep(stale_after + 0.2)
    assert sweep_until_failed("second@host") >= stale_after


# --------------------------------------------------------------------------------------------
# reclamation


@pytest.mark.django_db
def test_sweep_reclaims_a_dead_workers_tasks_and_publishes_them(
    timing: SettingsWrapper,
    published: Published,
    reclaimed_signal: Received,
    caplog: pytest.LogCaptureFixture,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    caplog.set_level(logging.WARNING, logger="worker_health")
    watched_for("default", STALE * 2)
    dead = make_worker("default", "dead@host")
    live = make_worker("default", "live@host")
    claimed_task("default", "run1", dead)
    claimed_task("default", "run2", dead)
    make_task("default", "prefetched")
    TaskQueue.objects.filter(task_id="prefetched").update(
        status="reserved", claimed_by=dead, claimed_incarnation=dead.incarnation
    )
    claimed_task("default", "live-task", live)
    age_heartbeat("default", dead, STALE * 3)

    with django_capture_on_commit_callbacks(execute=True):
        result = reclaim.sweep("test", force=True)

    assert result.failed_workers == ["dead@host"]
    assert sorted(result.reclaimed) == ["prefetched", "run1", "run2"]
    assert result.quarantined == []
    assert sorted(published.task_ids) == ["prefetched", "run1", "run2"]

    for task_id in ("run1", "run2"):
        task = TaskQueue.objects.get(task_id=task_id)
        assert task.status == "queued"
        assert task.claimed_by_id is None
        assert task.claimed_incarnation is None
        assert task.reclaim_lease is None
        assert task.reclaim_count == 1
        assert task.lost_on == ["dead@host"]
        assert task.reclaimed_at is not None
    prefetched = TaskQueue.objects.get(task_id="prefetched")
    # waiting in the dead worker's prefetch buffer does not count against the budget
    assert (prefetched.status, prefetched.reclaim_count, prefetched.lost_on) == ("queued", 0, [])
    live_task = TaskQueue.objects.get(task_id="live-task")
    assert (live_task.status, live_task.claimed_by_id) == ("claimed", live.pk)

    assert sorted(c["task"].task_id for c in reclaimed_signal.calls) == [
        "prefetched",
        "run1",
        "run2",
    ]
    assert {c["worker_id"] for c in reclaimed_signal.calls} == {"dead@host"}
    events = WorkerEvent.objects.filter(kind=EventKind.TASK_RECLAIMED)
    assert sorted(events.values_list("task_id", flat=True)) == ["prefetched", "run1", "run2"]
    assert all(e.details["published"] for e in events)
    records = [r for r in caplog.records if "task_reclaimed" in r.getMessage()]
    assert sorted(r.task_id for r in records) == ["prefetched", "run1", "run2"]  # type: ignore[attr-defined]


@pytest.mark.django_db
def test_publish_happens_only_after_commit(
    timing: SettingsWrapper,
    published: Published,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    dead = make_worker("default", "dead@host", status="failed")
    claimed_task("default", "t1", dead)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        outcome = reclaim.reclaim_orphans()
    assert outcome.reclaimed == ["t1"]
    assert published.task_ids == []  # not before the commit
    assert status_of("t1") == "reclaiming"
    assert callbacks
    for callback in callbacks:
        callback()
    assert published.task_ids == ["t1"]
    assert status_of("t1") == "queued"


@pytest.mark.django_db
def test_a_rolled_back_reclaim_publishes_nothing(
    timing: SettingsWrapper, published: Published
) -> None:
    dead = make_worker("default", "dead@host", status="failed")
    claimed_task("default", "t1", dead)

    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        reclaim.reclaim_orphans()
        raise Rollback
    assert published.task_ids == []
    assert status_of("t1") == "claimed"


@pytest.mark.django_db
def test_reclaim_of_an_offline_workers_leftovers(
    timing: SettingsWrapper,
    published: Published,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    # offline and silent for longer than STALE_AFTER: whatever it still holds is lost
    gone = make_worker("default", "gone@host", status="offline", heartbeat_age=3600)
    claimed_task("default", "t1", gone)
    # offline (drained by an operator) but still heartbeating: it is finishing its work
    draining = make_worker("default", "draining@host", status="offline")
    claimed_task("default", "t2", draining)
    with django_capture_on_commit_callbacks(execute=True):
        outcome = reclaim.reclaim_orphans()
    assert outcome.reclaimed == ["t1"]
    assert published.task_ids == ["t1"]
    event = WorkerEvent.objects.get(kind=EventKind.TASK_RECLAIMED)
    assert event.details["reason"] == "worker offline"


@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize("alias", ALIASES)
def test_a_reclaim_sends_the_same_statements_for_3_tasks_as_for_40(
    alias: str,
    timing: SettingsWrapper,
    published: Published,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    """Set-based: a dead worker's tasks are moved, published, marked and logged per batch,
    not per task (it was four statements per task: 10,000 tasks took ~50 s)."""
    if alias == "postgres":
        timing.DATABASE_ROUTERS = ["tests.test_reclaim.OnlyPostgres"]

    def statements(n: int) -> int:
        name = f"dead{n}@host"
        dead = make_worker(alias, name, status="failed")
        for i in range(n):
            claimed_task(alias, f"{name}-{i}", dead, lost_on=["x@host"] if i % 2 else [])
        with (
            CaptureQueriesContext(connections[alias]) as queries,
            django_capture_on_commit_callbacks(using=alias, execute=True),
        ):
            outcome = reclaim.reclaim(
                TaskQueue.objects.using(alias).held_by(dead), reason="test", worker_name=name
            )
        assert len(outcome.reclaimed) == n
        return len(queries)

    few, many = statements(3), statements(40)
    assert few == many, (few, many)
    assert many <= 12, many
    rows = TaskQueue.objects.using(alias).filter(task_id__startswith="dead40@")
    assert set(rows.values_list("status", "reclaim_count")) == {("queued", 1)}
    lost_on = {tuple(row.lost_on) for row in rows}
    assert lost_on == {("dead40@host",), ("x@host", "dead40@host")}
    events = WorkerEvent.objects.using(alias).filter(
        kind=EventKind.TASK_RECLAIMED, worker_name="dead40@host"
    )
    assert events.count() == 40
    assert {(e.details["published"], e.details["reclaim_count"]) for e in events} == {(True, 1)}


@pytest.mark.django_db
def test_one_failed_publish_leaves_only_that_task_for_the_outbox(
    timing: SettingsWrapper,
    published: Published,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    dead = make_worker("default", "dead@host", status="failed")
    for i in range(5):
        claimed_task("default", f"t{i}", dead)

    def flaky(task: TaskQueue) -> None:
        if task.task_id == "t2":
            raise ConnectionError("broker hiccup (test)")
        published(task)

    monkeypatch.setattr(publish, "republish", flaky)
    monkeypatch.setattr(reclaim, "MARK_EVERY", 2)
    with django_capture_on_commit_callbacks(execute=True):
        reclaim.reclaim_orphans()
    assert published.task_ids == ["t0", "t1", "t3", "t4"]
    statuses = dict(TaskQueue.objects.values_list("task_id", "status"))
    assert statuses == {
        "t0": "queued",
        "t1": "queued",
        "t2": "reclaiming",
        "t3": "queued",
        "t4": "queued",
    }


@pytest.mark.django_db
def test_a_quiet_sweep_looks_only_at_workers_that_died_recently(
    timing: SettingsWrapper,
    published: Published,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    """Between full scans, orphans are looked for from the recently dead workers, by index,
    so a sweep's cost does not follow the tasks live workers hold; every
    ``FULL_SCAN_EVERY`` check intervals one sweep looks at every held task."""
    window = 2 * CHECK * reclaim.FULL_SCAN_EVERY
    live = make_worker("default", "live@host")
    claimed_task("default", "live-task", live)
    long_failed = make_worker("default", "long-failed@host", status="failed")
    claimed_task("default", "long-failed-task", long_failed)
    WorkerRegistry.objects.filter(pk=long_failed.pk).update(
        status_changed_at=db_now_minus(window + 60)
    )
    just_failed = make_worker("default", "just-failed@host", status="failed")
    claimed_task("default", "just-failed-task", just_failed)
    drained = make_worker("default", "drained@host", status="offline", heartbeat_age=STALE + 5)
    claimed_task("default", "drained-task", drained)
    draining = make_worker("default", "draining@host", status="offline")
    claimed_task("default", "draining-task", draining)
    # a full scan ran just now
    DetectorState.objects.create(pk=1, last_full_scan_at=db_now_minus(1))

    with django_capture_on_commit_callbacks(execute=True):
        quiet = reclaim.reclaim_orphans()
    assert sorted(quiet.reclaimed) == ["drained-task", "just-failed-task"]
    assert status_of("long-failed-task") == "claimed"

    DetectorState.objects.filter(pk=1).update(
        last_full_scan_at=db_now_minus(CHECK * reclaim.FULL_SCAN_EVERY)
    )
    with django_capture_on_commit_callbacks(execute=True):
        full = reclaim.reclaim_orphans()
    assert full.reclaimed == ["long-failed-task"]
    assert status_of("live-task") == "claimed"
    assert status_of("draining-task") == "claimed"
    # the full scan is not due again at once
    with django_capture_on_commit_callbacks(execute=True):
        assert reclaim.reclaim_orphans().reclaimed == []


@pytest.mark.django_db
def test_reclaim_tasks_of_a_live_worker(
    timing: SettingsWrapper,
    published: Published,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    """A restart takes only the previous incarnation's tasks; an operator takes all."""
    worker = make_worker("default", "w1@host")
    claimed_task("default", "old", worker)
    worker = WorkerRegistry.objects.register(
        "w1@host", incarnation=uuid.uuid4(), metadata={}
    ).worker
    claimed_task("default", "new", worker)
    with django_capture_on_commit_callbacks(execute=True):
        restarted = reclaim.reclaim_tasks_of(worker, reason="restarted")
    assert restarted.reclaimed == ["old"]
    assert status_of("new") == "claimed"
    with django_capture_on_commit_callbacks(execute=True):
        manual = reclaim.reclaim_tasks_of(worker, reason="manual")
    assert manual.reclaimed == ["new"]
    assert published.task_ids == ["old", "new"]


@pytest.mark.django_db
def test_a_task_without_a_recorded_message_is_queued_not_published(
    timing: SettingsWrapper,
    published: Published,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    dead = make_worker("default", "dead@host", status="failed")
    claimed_task("default", "t1", dead, body=None)
    with django_capture_on_commit_callbacks(execute=True):
        reclaim.reclaim_orphans()
    assert published.task_ids == []
    assert status_of("t1") == "queued"


# --------------------------------------------------------------------------------------------
# quarantine


@pytest.mark.django_db
def test_quarantine_after_max_reclaims_names_the_workers(
    timing: SettingsWrapper,
    published: Published,
    quarantined_signal: Received,
    caplog: pytest.LogCaptureFixture,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    timing.WORKER_HEALTH_MAX_RECLAIMS = 2
    caplog.set_level(logging.WARNING, logger="worker_health")
    dead = make_worker("default", "b@host", status="failed")
    claimed_task("default", "poison", dead, reclaim_count=2, lost_on=["a@host", "a@host"])
    with django_capture_on_commit_callbacks(execute=True):
        outcome = reclaim.reclaim_orphans()

    assert outcome.quarantined == ["poison"]
    assert outcome.reclaimed == []
    assert published.task_ids == []
    task = TaskQueue.objects.get(task_id="poison")
    assert task.status == "quarantined"
    assert task.finished_at is not None
    assert task.claimed_by_id is None
    assert task.reclaim_count == 3
    assert task.lost_on == ["a@host", "a@host", "b@host"]

    event = WorkerEvent.objects.get(kind=EventKind.TASK_QUARANTINED)
    message = event.details["message"]
    assert "a@host (2x)" in message
    assert "b@host (1x)" in message
    assert "WORKER_HEALTH_MAX_RECLAIMS=2" in message
    assert "demo.tasks.work" in message
    (record,) = [r for r in caplog.records if "task_quarantined" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert "a@host (2x)" in record.getMessage()
    (call,) = quarantined_signal.calls
    assert call["task"].task_id == "poison"
    assert call["worker_id"] == "b@host"


@pytest.mark.django_db
def test_quarantine_is_stored_in_the_result_backend(
    timing: SettingsWrapper,
    published: Published,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    from django_celery_results.models import TaskResult

    timing.WORKER_HEALTH_MAX_RECLAIMS = 0
    dead = make_worker("default", "dead@host", status="failed")
    claimed_task("default", "poison", dead)
    with django_capture_on_commit_callbacks(execute=True):
        reclaim.reclaim_orphans()
    result = TaskResult.objects.get(task_id="poison")
    assert result.status == "FAILURE"
    assert "TaskQuarantined" in (result.result or "")
    assert "dead@host (1x)" in (result.result or "")


@pytest.mark.django_db
def test_below_max_reclaims_a_task_is_published_again(
    timing: SettingsWrapper,
    published: Published,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    timing.WORKER_HEALTH_MAX_RECLAIMS = 2
    dead = make_worker("default", "b@host", status="failed")
    claimed_task("default", "t1", dead, reclaim_count=1, lost_on=["a@host"])
    with django_capture_on_commit_callbacks(execute=True):
        outcome = reclaim.reclaim_orphans()
    assert outcome.reclaimed == ["t1"]
    assert published.task_ids == ["t1"]
    assert TaskQueue.objects.get(task_id="t1").reclaim_count == 2


@pytest.mark.django_db
def test_a_prefetched_task_is_never_quarantined(
    timing: SettingsWrapper,
    published: Published,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    timing.WORKER_HEALTH_MAX_RECLAIMS = 0
    dead = make_worker("default", "dead@host", status="failed")
    make_task(
        "default",
        "waiting",
        status="reserved",
        claimed_by=dead,
        claimed_incarnation=dead.incarnation,
    )
    with django_capture_on_commit_callbacks(execute=True):
        outcome = reclaim.reclaim_orphans()
    assert outcome.quarantined == []
    assert published.task_ids == ["waiting"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("token", "started", "counted"),
    [
        (1, None, True),  # a first run records no start: presumed started
        (2, None, False),  # a later run that never started (it waited in the prefetch buffer)
        (2, 1, False),  # the start of an earlier run is not this one's
        (2, 2, True),  # a later run that recorded its start
    ],
)
def test_only_runs_that_started_or_may_have_count_against_max_reclaims(
    timing: SettingsWrapper,
    published: Published,
    django_capture_on_commit_callbacks: CaptureCallbacks,
    token: int,
    started: int | None,
    counted: bool,
) -> None:
    """K5: a task held by several killed workers in a row, by chance, while it waited in
    their prefetch buffers, is not a poison pill and must not be quarantined."""
    timing.WORKER_HEALTH_MAX_RECLAIMS = 1
    dead = make_worker("default", "b@host", status="failed")
    make_task(
        "default",
        "t1",
        status="claimed",
        claimed_by=dead,
        claimed_incarnation=dead.incarnation,
        fencing_token=token,
        started_token=started,
        reclaim_count=1,
        lost_on=["a@host"],
    )
    with django_capture_on_commit_callbacks(execute=True):
        outcome = reclaim.reclaim_orphans()
    task = TaskQueue.objects.get(task_id="t1")
    if counted:
        assert outcome.quarantined == ["t1"]
        assert task.status == "quarantined"
        assert (task.reclaim_count, task.lost_on) == (2, ["a@host", "b@host"])
        assert published.task_ids == []
    else:
        assert outcome.reclaimed == ["t1"]
        assert task.status == "queued"
        assert (task.reclaim_count, task.lost_on) == (1, ["a@host"])
        assert published.task_ids == ["t1"]


@pytest.mark.django_db
def test_a_pool_process_lost_running_a_task_counts_even_without_a_recorded_start(
    timing: SettingsWrapper,
    published: Published,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    """``WorkerLostError``: the worker saw the run die, whatever the row says (its start
    could not be written if the database was unreachable at that moment)."""
    from worker_health.heartbeat import WorkerIdentity

    timing.WORKER_HEALTH_MAX_RECLAIMS = 3
    worker = make_worker("default", "w@host")
    make_task(
        "default",
        "t1",
        status="claimed",
        claimed_by=worker,
        claimed_incarnation=worker.incarnation,
        fencing_token=2,
        started_token=None,
        reclaim_count=1,
    )
    identity = WorkerIdentity(
        worker_id=worker.worker_id, incarnation=worker.incarnation, metadata={}, pk=worker.pk
    )
    with django_capture_on_commit_callbacks(execute=True):
        outcome = reclaim.reclaim_lost_task("t1", identity)
    assert outcome.reclaimed == ["t1"]
    task = TaskQueue.objects.get(task_id="t1")
    assert (task.reclaim_count, task.lost_on) == (2, ["w@host"])


def test_quarantine_message(settings: SettingsWrapper) -> None:
    settings.WORKER_HEALTH_MAX_RECLAIMS = 3
    message = reclaim.quarantine_message("app.tasks.crash", ["w1", "w2", "w1"])
    assert "app.tasks.crash" in message
    assert "3 times" in message
    assert "w1 (2x), w2 (1x)" in message
    assert "WORKER_HEALTH_MAX_RECLAIMS=3" in message


# --------------------------------------------------------------------------------------------
# the outbox


@pytest.mark.django_db
def test_a_failed_publish_stays_reclaiming_and_the_outbox_publishes_it_later(
    timing: SettingsWrapper,
    published: Published,
    caplog: pytest.LogCaptureFixture,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    dead = make_worker("default", "dead@host", status="failed")
    claimed_task("default", "t1", dead)
    published.fail = True
    with django_capture_on_commit_callbacks(execute=True):
        outcome = reclaim.reclaim_orphans()
    assert outcome.reclaimed == ["t1"]
    task = TaskQueue.objects.get(task_id="t1")
    assert task.status == "reclaiming"
    assert task.reclaim_lease is not None
    assert any("could not publish reclaimed task t1" in r.getMessage() for r in caplog.records)
    event = WorkerEvent.objects.get(kind=EventKind.TASK_RECLAIMED)
    assert event.details["published"] is False

    published.fail = False
    # too recent: another detector may still be publishing it
    assert reclaim.flush_outbox() == []
    assert published.task_ids == []

    TaskQueue.objects.filter(task_id="t1").update(
        reclaimed_at=db_now_minus(reclaim.outbox_grace() + 1)
    )
    assert reclaim.flush_outbox() == ["t1"]
    assert published.task_ids == ["t1"]
    task = TaskQueue.objects.get(task_id="t1")
    assert (task.status, task.reclaim_lease) == ("queued", None)
    assert reclaim.flush_outbox() == []  # once


@pytest.mark.django_db
def test_the_sweep_flushes_the_outbox(timing: SettingsWrapper, published: Published) -> None:
    make_task("default", "stuck", status="reclaiming", reclaim_lease=uuid.uuid4())
    TaskQueue.objects.filter(task_id="stuck").update(reclaimed_at=db_now_minus(3600))
    result = reclaim.sweep("d", force=True)
    assert result.republished == ["stuck"]
    assert published.task_ids == ["stuck"]
    assert status_of("stuck") == "queued"


@pytest.mark.django_db
def test_the_outbox_still_failing_keeps_the_row(
    timing: SettingsWrapper, published: Published
) -> None:
    make_task("default", "stuck", status="reclaiming", reclaim_lease=uuid.uuid4())
    TaskQueue.objects.filter(task_id="stuck").update(reclaimed_at=db_now_minus(3600))
    published.fail = True
    assert reclaim.flush_outbox() == []
    assert status_of("stuck") == "reclaiming"
    # retried by a later flush once it is due again
    TaskQueue.objects.filter(task_id="stuck").update(reclaimed_at=db_now_minus(3600))
    published.fail = False
    assert reclaim.flush_outbox() == ["stuck"]


@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("path", ["gate", "pool process"])
def test_a_retry_of_a_reclaimed_task_is_not_published_again_by_the_outbox(
    alias: str,
    path: str,
    timing: SettingsWrapper,
    published: Published,
    django_capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    """The outbox publishes a reclaim again when no live worker received it. Once one
    did, a later return to ``queued`` (a Celery retry with a countdown) is not a lost
    publish: publishing the recorded message then would run the task early, as its
    previous attempt."""
    if alias == "postgres":
        timing.DATABASE_ROUTERS = ["tests.test_reclaim.OnlyPostgres"]
    rows = TaskQueue.objects.using(alias)
    dead = make_worker(alias, "dead@host", status="failed")
    claimed_task(alias, "t1", dead)
    with django_capture_on_commit_callbacks(using=alias, execute=True):
        assert reclaim.reclaim_orphans().reclaimed == ["t1"]
    assert published.task_ids == ["t1"]
    live = make_worker(alias, "live@host")
    if path == "gate":
        token = rows.claim_received(
            [delivery("t1")], worker_pk=live.pk, incarnation=live.incarnation
        )["t1"]
    else:
        token = rows.claim(
            task_id="t1",
            task_name="demo.tasks.work",
            queue="celery",
            worker_pk=live.pk,
            incarnation=live.incarnation,
        )
    assert token is not None and token > 0
    assert rows.requeue_own("t1", token)  # self.retry(countdown=...)
    rows.filter(task_id="t1").update(reclaimed_at=db_now_minus(3600))
    assert reclaim.flush_outbox() == []
    assert published.task_ids == ["t1"]


@needs_postgres
@pytest.mark.django_db(databases="__all__")
def test_the_outbox_finds_unpicked_reclaims_by_index_not_by_scanning_the_backlog(
    timing: SettingsWrapper, published: Published
) -> None:
    """A queued backlog of a million tasks made every sweep scan it (17 ms per 8,000)."""
    timing.DATABASE_ROUTERS = ["tests.test_reclaim.OnlyPostgres"]
    with connections["postgres"].cursor() as cursor:
        cursor.execute(
            "INSERT INTO task_queue (task_id, task_name, status, queue, exchange, routing_key,"
            " content_type, content_encoding, fencing_token, reclaim_count, publish_attempts,"
            " lost_on, created_at, updated_at, reclaimed_at)"
            " SELECT 'b' || g, 'demo.tasks.work', 'queued', 'celery', '', 'celery', '', '',"
            " 0, 0, 0, '[]', now(), now(), CASE WHEN g % 2 = 0 THEN now() END"
            " FROM generate_series(1, 20000) g"
        )
        cursor.execute("ANALYZE task_queue")
    seen: list[str] = []

    def explain(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if sql.startswith("SELECT") and "publish_attempts" in sql and "EXPLAIN" not in sql:
            with context["connection"].cursor() as cursor:
                cursor.execute("EXPLAIN " + sql, params)
                seen.append("\n".join(row[0] for row in cursor.fetchall()))
        return execute(sql, params, many, context)

    with connections["postgres"].execute_wrapper(explain):
        assert reclaim.flush_outbox() == []
    unpicked = [plan for plan in seen if "wh_task_unpicked_idx" in plan]
    assert unpicked, seen
    assert not any("Seq Scan on task_queue" in plan for plan in seen), seen


@pytest.mark.django_db
def test_an_operators_requeue_of_a_quarantined_task_is_published_by_the_next_flush(
    timing: SettingsWrapper, published: Published
) -> None:
    make_task("default", "poison", status="quarantined", reclaim_count=4, lost_on=["a", "b"])
    pk = TaskQueue.objects.get(task_id="poison").pk
    assert TaskQueue.objects.requeue_quarantined([pk]) == [str(pk)]
    assert reclaim.flush_outbox() == ["poison"]
    assert published.task_ids == ["poison"]
    task = TaskQueue.objects.get(task_id="poison")
    assert (task.status, task.reclaim_count) == ("queued", 0)


# --------------------------------------------------------------------------------------------
# concurrency


class OnlyPostgres:
    """Routes every model to the ``postgres`` test alias."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "postgres"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "postgres"

    def allow_relation(self, *args: Any, **hints: Any) -> bool:
        return True


def run_concurrently(n: int, fn: Callable[[], object]) -> list[BaseException]:
    """Run ``fn`` on ``n`` threads released at the same moment; return their exceptions."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            barrier.wait(timeout=30)
            fn()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=target) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a reclaimer thread hung"
    return errors


#: Django < 5.1 cannot open SQLite transactions with BEGIN IMMEDIATE
CONCURRENT_ALIASES = [
    pytest.param(
        "default",
        id="sqlite",
        marks=pytest.mark.xfail(
            django.VERSION < (5, 1),
            strict=True,
            reason="bug: on Django < 5.1 with SQLite, reclaim() reads and then writes in one "
            "deferred transaction; a second reclaimer gets OperationalError('database is "
            "locked') at once instead of waiting (worker_health/reclaim.py, reclaim())",
        ),
    ),
    ALIASES[1],
]


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("alias", CONCURRENT_ALIASES)
def test_concurrent_reclaims_publish_each_task_once(
    alias: str, timing: SettingsWrapper, published: Published
) -> None:
    if alias == "postgres":
        timing.DATABASE_ROUTERS = ["tests.test_reclaim.OnlyPostgres"]
    dead = make_worker(alias, "dead@host", status="failed")
    task_ids = [f"t{i:03d}" for i in range(60)]
    for task_id in task_ids:
        claimed_task(alias, task_id, dead)

    outcomes: list[reclaim.ReclaimOutcome] = []

    def reclaimer() -> None:
        outcomes.append(
            reclaim.reclaim(
                TaskQueue.objects.orphaned(), reason="test", worker_name="dead@host", batch_size=7
            )
        )

    errors = run_concurrently(3, reclaimer)
    assert errors == []

    counts = Counter(published.task_ids)
    assert sorted(counts) == task_ids
    assert set(counts.values()) == {1}, [t for t, n in counts.items() if n > 1]
    reclaimed = [t for outcome in outcomes for t in outcome.reclaimed]
    assert sorted(reclaimed) == task_ids  # each moved by exactly one reclaimer
    rows = TaskQueue.objects.using(alias)
    assert set(rows.values_list("status", flat=True)) == {"queued"}
    assert set(rows.values_list("reclaim_count", flat=True)) == {1}
    assert WorkerEvent.objects.using(alias).filter(kind=EventKind.TASK_RECLAIMED).count() == 60


@pytest.mark.django_db(transaction=True, databases="__all__")
@pytest.mark.parametrize("alias", CONCURRENT_ALIASES)
def test_concurrent_sweeps_fail_a_worker_once(
    alias: str, timing: SettingsWrapper, published: Published, failed_signal: Received
) -> None:
    if alias == "postgres":
        timing.DATABASE_ROUTERS = ["tests.test_reclaim.OnlyPostgres"]
    watched_for(alias, STALE * 2)
    dead = make_worker(alias, "dead@host", heartbeat_age=STALE * 3)
    for i in range(10):
        claimed_task(alias, f"t{i}", dead)
    age_heartbeat(alias, dead, STALE * 3)

    errors = run_concurrently(3, lambda: reclaim.sweep("d", force=True))
    assert errors == []
    assert len(failed_signal.calls) == 1
    assert sorted(Counter(published.task_ids).items()) == [(f"t{i}", 1) for i in range(10)]

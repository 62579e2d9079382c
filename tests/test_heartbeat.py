"""worker_health.heartbeat: the heart's own behaviour, in-process (real workers in
tests/integration/test_heartbeat.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from django.db import connections

from tests.factories import make_worker, needs_postgres
from worker_health import reclaim
from worker_health.heartbeat import Heart, WorkerIdentity
from worker_health.models import DetectorState
from worker_health.querysets import db_now_minus

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_slow_sweep_never_delays_the_heartbeats(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep runs on a thread of its own: while one takes longer than STALE_AFTER (a big
    reclaim, a starved database), the worker running it keeps beating, so that no other
    detector fails it."""
    settings.WORKER_HEALTH_HEARTBEAT_INTERVAL = 0.1
    settings.WORKER_HEALTH_STALE_AFTER = 0.5
    settings.WORKER_HEALTH_CHECK_INTERVAL = 0.1
    worker = make_worker("default", "heart@host")
    identity = WorkerIdentity(
        worker_id=worker.worker_id, incarnation=worker.incarnation, metadata={}, pk=worker.pk
    )
    sweeping = threading.Event()
    release = threading.Event()
    sweeps: list[str] = []

    def slow_sweep(who: str, **_: Any) -> None:
        sweeps.append(threading.current_thread().name)
        sweeping.set()
        release.wait(10)

    monkeypatch.setattr(reclaim, "sweep", slow_sweep)
    heart = Heart(identity)
    heart.registered = True
    heart.start()
    try:
        assert sweeping.wait(5), "the heart never asked for a sweep"
        beats = heart.beats
        deadline = time.monotonic() + 5
        while heart.beats < beats + 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert heart.beats >= beats + 5, "heartbeats stopped while a sweep ran"
        assert sweeps == ["worker-health-sweep[heart@host]"]  # one at a time, off the heart
    finally:
        release.set()
        heart.stop()
    assert not heart.alive


@needs_postgres
@pytest.mark.django_db(transaction=True, databases="__all__")
def test_the_heart_asks_for_a_sweep_only_when_one_is_due(settings: Any) -> None:
    """PostgreSQL: the heartbeat reads the last sweep's time; the heart pokes its sweeper
    (which tries the lease: two statements that lose) only when a sweep is due."""
    settings.DATABASE_ROUTERS = ["tests.test_reclaim.OnlyPostgres"]
    settings.WORKER_HEALTH_CHECK_INTERVAL = 30
    worker = make_worker("postgres", "heart@host")
    identity = WorkerIdentity(
        worker_id=worker.worker_id, incarnation=worker.incarnation, metadata={}, pk=worker.pk
    )
    heart = Heart(identity)
    heart.registered = True
    pokes: list[float] = []
    heart.sweeper.poke = lambda: pokes.append(time.monotonic())  # type: ignore[method-assign]
    DetectorState.objects.db_manager("postgres").take_sweep_lease("other@host", 27, 60, force=True)
    try:
        assert heart.beat_once()
        heart._maybe_sweep()
        assert pokes == []  # another worker swept just now
        DetectorState.objects.using("postgres").filter(pk=1).update(last_sweep_at=db_now_minus(28))
        assert heart.beat_once()
        heart._maybe_sweep()
        assert len(pokes) == 1
    finally:
        connections.close_all()

"""worker_health.heartbeat: the heart's own behaviour, in-process (real workers in
tests/integration/test_heartbeat.py)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.factories import make_worker
from worker_health import reclaim
from worker_health.heartbeat import Heart, WorkerIdentity

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

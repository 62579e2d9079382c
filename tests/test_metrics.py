"""Numbers read from the database: the overview's counts and charts, and Prometheus."""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.dashboard_data import make_event, make_task, make_worker, scenario
from worker_health import metrics
from worker_health.models import DetectorState, EventKind

pytestmark = pytest.mark.django_db

METRICS = "/worker-health/metrics"
TOKEN = "metrics-token"


@pytest.fixture
def scrape(client: Client, settings: Any) -> Any:
    settings.WORKER_HEALTH_API_TOKEN = TOKEN

    def get() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        response = client.get(METRICS, HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/plain; version=")
        samples = {}
        for family in text_string_to_metric_families(response.content.decode()):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    return get


def test_metrics_expose_workers_tasks_events_and_the_detector(scrape: Any) -> None:
    scenario()
    make_event(EventKind.STALE_COMPLETION, worker_name="gamma@web-3", task_id="t")
    DetectorState.objects.take_sweep_lease("beat@h", 0, 60, force=True)
    DetectorState.objects.record_sweep_done(0.25)
    samples = scrape()
    for status, n in (("active", 1), ("late", 1), ("failed", 1), ("offline", 1)):
        assert samples[("worker_health_workers", (("status", status),))] == n
    age = samples[("worker_health_worker_heartbeat_age_seconds", (("worker", "beta@web-2"),))]
    assert 44 <= age <= 60
    # failed and offline workers have no age series (they would grow forever)
    assert ("worker_health_worker_heartbeat_age_seconds", (("worker", "gamma@web-3"),)) not in (
        samples
    )
    assert samples[("worker_health_stale_after_seconds", ())] == 60
    assert samples[("worker_health_tasks", (("status", "claimed"),))] == 1
    assert samples[("worker_health_tasks", (("status", "quarantined"),))] == 1
    assert samples[("worker_health_tasks", (("status", "reclaiming"),))] == 0
    assert samples[("worker_health_worker_failures_total", ())] == 1
    assert samples[("worker_health_tasks_reclaimed_total", ())] == 2
    assert samples[("worker_health_tasks_quarantined_total", ())] == 1
    assert samples[("worker_health_stale_completions_total", ())] == 1
    assert samples[("worker_health_detector_last_sweep_duration_seconds", ())] == 0.25
    last_success = samples[("worker_health_detector_last_success_timestamp_seconds", ())]
    assert abs(last_success - timezone.now().timestamp()) < 60


def test_metrics_without_a_detector_row_leave_its_gauges_out(scrape: Any) -> None:
    samples = scrape()
    assert not any(name.startswith("worker_health_detector") for name, _ in samples)
    assert samples[("worker_health_workers", (("status", "active"),))] == 0


def test_a_scrape_runs_a_constant_number_of_queries(client: Client, settings: Any) -> None:
    settings.WORKER_HEALTH_API_TOKEN = TOKEN
    make_worker("one@h")

    def count() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert client.get(METRICS, HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200
        return len(ctx.captured_queries)

    one = count()
    for i in range(50):
        w = make_worker(f"w{i}@h")
        make_task(f"t{i}", worker=w)
        make_event(EventKind.TASK_RECLAIMED, worker_name=w.worker_id)
    assert count() == one <= 6


def test_metrics_answer_501_without_prometheus_client(
    client: Client, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.WORKER_HEALTH_API_TOKEN = TOKEN
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    response = client.get(METRICS, HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 501
    assert b"pip install 'django-celery-worker-health[prometheus]'" in response.content


def test_register_adds_the_collector_without_querying() -> None:
    registry = CollectorRegistry()
    with CaptureQueriesContext(connection) as ctx:
        metrics.register(registry)
    assert ctx.captured_queries == []
    make_worker("a@h")
    assert registry.get_sample_value("worker_health_workers", {"status": "active"}) == 1


# --------------------------------------------------------------------------------------------
# the numbers behind the overview


def test_database_now_reads_the_database_clock() -> None:
    now = metrics.database_now()
    assert abs((now - timezone.now()).total_seconds()) < 5
    assert now.tzinfo is not None


def test_worker_counts_split_late_from_active() -> None:
    make_worker("fresh@h", heartbeat_age=1)
    make_worker("late@h", heartbeat_age=35)
    make_worker("stale@h", heartbeat_age=500)  # not failed yet: still late, not active
    make_worker("dead@h", status="failed")
    assert metrics.worker_counts() == {"active": 1, "late": 2, "failed": 1, "offline": 0}
    assert metrics.live_worker_count() == 2  # fresher than STALE_AFTER


def test_task_counts_are_exact_for_held_and_capped_for_the_rest() -> None:
    w = make_worker("a@h")
    make_task("c1", worker=w)
    make_task("r1", worker=w, status="reserved")
    for i in range(4):
        make_task(f"s{i}", status="succeeded")
    counts = {c.status: c for c in metrics.task_counts(cap=2)}
    assert (counts["claimed"].count, counts["claimed"].exact) == (1, True)
    assert (counts["reserved"].count, counts["reserved"].exact) == (1, True)
    assert (counts["succeeded"].count, counts["succeeded"].exact) == (2, False)
    assert (counts["failed"].count, counts["failed"].exact) == (0, True)
    assert [c.status for c in metrics.task_counts()][:4] == list(metrics.EXACT_TASK_STATUSES)


def test_events_per_hour_buckets_the_last_24_hours() -> None:
    for hours_ago in (0, 0.2, 2.5, 22.5, 30):
        make_event(EventKind.WORKER_FAILED, hours_ago=hours_ago)
    make_event(EventKind.TASK_RECLAIMED, hours_ago=1)
    now = metrics.database_now()
    series = {s.kind: s for s in metrics.events_per_hour(now=now)}
    failed = series[EventKind.WORKER_FAILED]
    assert len(failed.counts) == 24
    assert failed.start == now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
    assert failed.total == 4  # 30 h ago is outside the window
    assert failed.counts[-1] + failed.counts[-2] >= 2
    assert series[EventKind.TASK_RECLAIMED].total == 1
    assert series[EventKind.TASK_QUARANTINED].total == 0

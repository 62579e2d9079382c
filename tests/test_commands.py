"""``manage.py worker_health <status|detect|reclaim|prune|probe>``."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.factories import claimed_task, make_task, make_worker, watched_for
from worker_health import publish
from worker_health.models import TaskQueue, WorkerEvent, WorkerRegistry
from worker_health.querysets import db_now_minus

pytestmark = pytest.mark.django_db

#: pytest-django's ``settings`` fixture (its class was renamed between releases)
SettingsWrapper = Any
CaptureCallbacks = Callable[..., Any]


@pytest.fixture(autouse=True)
def timing(settings: SettingsWrapper) -> SettingsWrapper:
    settings.WORKER_HEALTH_HEARTBEAT_INTERVAL = 10
    settings.WORKER_HEALTH_STALE_AFTER = 20
    settings.WORKER_HEALTH_CHECK_INTERVAL = 5
    settings.WORKER_HEALTH_RETENTION = timedelta(days=7)
    return settings


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    task_ids: list[str] = []
    monkeypatch.setattr(publish, "republish", lambda task: task_ids.append(task.task_id))
    return task_ids


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("worker_health", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def run_json(*args: str) -> Any:
    out, _ = run(*args)
    return json.loads(out)


# --------------------------------------------------------------------------------------------
# status


def test_status_json_shape() -> None:
    make_worker("default", "a@host")
    make_worker("default", "b@host")
    make_worker("default", "c@host", status="failed", heartbeat_age=100)
    make_worker("default", "d@host", status="offline")
    WorkerRegistry.objects.filter(worker_id="a@host").update(tasks_processed=12)

    summary = run_json("status")

    assert summary["active_workers"] == 2
    assert summary["failed_workers"] == 1
    workers = {w["id"]: w for w in summary["workers"]}
    assert sorted(workers) == ["a@host", "b@host", "c@host", "d@host"]
    for worker in summary["workers"]:
        assert {"id", "status", "last_heartbeat", "tasks_processed"} <= set(worker)
        assert isinstance(worker["last_heartbeat"], str)
        # ISO 8601 in UTC
        parsed = datetime.fromisoformat(worker["last_heartbeat"].replace("Z", "+00:00"))
        assert parsed.utcoffset() == timedelta(0)
        assert isinstance(worker["tasks_processed"], int)
    assert workers["a@host"]["status"] == "active"
    assert workers["a@host"]["tasks_processed"] == 12
    assert workers["c@host"]["status"] == "failed"
    assert workers["d@host"]["status"] == "offline"
    assert workers["c@host"]["last_heartbeat"] < workers["a@host"]["last_heartbeat"]


def test_status_of_an_empty_registry() -> None:
    summary = run_json("status")
    assert summary["active_workers"] == 0
    assert summary["failed_workers"] == 0
    assert summary["workers"] == []


def test_status_indent() -> None:
    make_worker("default")
    compact, _ = run("status", "--indent", "0")
    assert "\n" not in compact.strip()
    pretty, _ = run("status")
    assert "\n  " in pretty
    assert json.loads(compact)["workers"][0]["id"] == json.loads(pretty)["workers"][0]["id"]


# --------------------------------------------------------------------------------------------
# detect


def test_detect_fails_stale_workers_and_reclaims(
    published: list[str], django_capture_on_commit_callbacks: CaptureCallbacks
) -> None:
    watched_for("default", 60)
    dead = make_worker("default", "dead@host")
    claimed_task("default", "t1", dead)
    WorkerRegistry.objects.filter(pk=dead.pk).update(last_heartbeat=db_now_minus(100))
    make_worker("default", "fresh@host")

    with django_capture_on_commit_callbacks(execute=True):
        result = run_json("detect")

    assert result["swept"] is True
    assert result["failed_workers"] == ["dead@host"]
    assert result["reclaimed"] == ["t1"]
    assert result["quarantined"] == []
    assert published == ["t1"]
    assert WorkerRegistry.objects.get(worker_id="dead@host").status == "failed"
    assert WorkerRegistry.objects.get(worker_id="fresh@host").status == "active"


def test_detect_ignores_the_lease_unless_asked(published: list[str]) -> None:
    assert run_json("detect")["swept"] is True
    assert run_json("detect")["swept"] is True  # forced by default: an operator asked
    assert run_json("detect", "--respect-lease")["swept"] is False


# --------------------------------------------------------------------------------------------
# reclaim


def test_reclaim_a_worker_now(
    published: list[str], django_capture_on_commit_callbacks: CaptureCallbacks
) -> None:
    worker = make_worker("default", "w1@host")
    claimed_task("default", "t1", worker)
    claimed_task("default", "t2", worker)
    other = make_worker("default", "w2@host")
    claimed_task("default", "t3", other)

    with django_capture_on_commit_callbacks(execute=True):
        result = run_json("reclaim", "w1@host")

    assert sorted(result["reclaimed"]) == ["t1", "t2"]
    assert result["quarantined"] == []
    assert sorted(published) == ["t1", "t2"]
    assert TaskQueue.objects.get(task_id="t3").status == "claimed"


def test_reclaim_of_an_unknown_worker_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="nobody@host"):
        run("reclaim", "nobody@host")


def test_reclaim_requires_a_worker_id() -> None:
    with pytest.raises(CommandError):
        run("reclaim")


def test_unknown_action_is_a_command_error() -> None:
    with pytest.raises(CommandError):
        run("explode")


# --------------------------------------------------------------------------------------------
# prune


def test_prune_deletes_old_finished_tasks_and_events() -> None:
    for i in range(3):
        make_task("default", f"old{i}", status="succeeded")
    make_task("default", "recent", status="succeeded")
    make_task("default", "running", status="claimed")
    TaskQueue.objects.filter(task_id__startswith="old").update(finished_at=db_now_minus(8 * 86400))
    TaskQueue.objects.filter(task_id="recent").update(finished_at=db_now_minus(60))
    TaskQueue.objects.filter(task_id="running").update(finished_at=db_now_minus(8 * 86400))
    WorkerEvent.objects.create(kind="worker_failed", worker_name="old")
    WorkerEvent.objects.create(kind="worker_failed", worker_name="new")
    WorkerEvent.objects.filter(worker_name="old").update(created_at=db_now_minus(8 * 86400))

    assert run_json("prune") == {"tasks": 3, "events": 1}
    assert sorted(TaskQueue.objects.values_list("task_id", flat=True)) == ["recent", "running"]
    assert list(WorkerEvent.objects.values_list("worker_name", flat=True)) == ["new"]
    assert run_json("prune") == {"tasks": 0, "events": 0}


def test_prune_uses_the_retention_setting(timing: SettingsWrapper) -> None:
    make_task("default", "t1", status="failed")
    TaskQueue.objects.filter(task_id="t1").update(finished_at=db_now_minus(7200))
    assert run_json("prune")["tasks"] == 0
    timing.WORKER_HEALTH_RETENTION = timedelta(hours=1)
    assert run_json("prune")["tasks"] == 1


# --------------------------------------------------------------------------------------------
# probe


def test_probe_ok_for_a_fresh_worker() -> None:
    make_worker("default", "w1@host")
    out, err = run("probe", "--worker", "w1@host")
    assert out.startswith("ok: w1@host")
    assert err == ""


def test_probe_fails_for_a_stale_worker() -> None:
    make_worker("default", "w1@host", heartbeat_age=100)
    with pytest.raises(SystemExit) as excinfo:
        run("probe", "--worker", "w1@host")
    assert excinfo.value.code == 1


def test_probe_fails_for_a_failed_worker() -> None:
    make_worker("default", "w1@host", status="failed")
    err = StringIO()
    with pytest.raises(SystemExit) as excinfo:
        call_command("worker_health", "probe", "--worker", "w1@host", stdout=StringIO(), stderr=err)
    assert excinfo.value.code == 1
    assert "w1@host is failed" in err.getvalue()


def test_probe_fails_for_an_unknown_worker() -> None:
    err = StringIO()
    with pytest.raises(SystemExit) as excinfo:
        call_command("worker_health", "probe", "--worker", "x@host", stdout=StringIO(), stderr=err)
    assert excinfo.value.code == 1
    assert "not registered" in err.getvalue()


def test_probe_without_a_name_looks_at_this_host() -> None:
    with pytest.raises(SystemExit):
        run("probe")
    host = socket.gethostname()
    make_worker("default", f"celery@{host}")
    out, _ = run("probe")
    assert f"celery@{host}" in out

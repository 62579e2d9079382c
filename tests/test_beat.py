"""worker_health.beat: the detector and the pruner join every Celery app's beat schedule."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery import Celery

from worker_health import beat
from worker_health.tasks import DETECT_TASK, PRUNE_TASK

#: pytest-django's ``settings`` fixture (its class was renamed between releases)
SettingsWrapper = Any


@pytest.fixture
def check_interval(settings: SettingsWrapper) -> float:
    settings.WORKER_HEALTH_HEARTBEAT_INTERVAL = 10
    settings.WORKER_HEALTH_STALE_AFTER = 30
    settings.WORKER_HEALTH_CHECK_INTERVAL = 7
    if hasattr(settings, "WORKER_HEALTH_BEAT_SCHEDULE"):
        del settings.WORKER_HEALTH_BEAT_SCHEDULE
    return 7.0


def new_app(config: dict[str, Any] | None = None) -> Celery:
    app = Celery("beat-test", set_as_current=False)
    app.config_from_object(config or {"broker_url": "memory://"})
    return app


def assert_entries(schedule: dict[str, Any], seconds: float) -> None:
    detect = schedule[beat.DETECT_ENTRY]
    assert detect["task"] == DETECT_TASK
    assert detect["schedule"] == timedelta(seconds=seconds)
    assert detect["options"]["expires"] == seconds * 2
    prune = schedule[beat.PRUNE_ENTRY]
    assert prune["task"] == PRUNE_TASK
    assert prune["schedule"] == timedelta(hours=1)


def test_install_adds_both_entries_with_the_check_interval(check_interval: float) -> None:
    app = new_app()
    beat.install(app)
    assert_entries(app.conf.beat_schedule, check_interval)


def test_install_on_an_already_configured_app(check_interval: float) -> None:
    app = new_app()
    assert app.conf.beat_schedule == {}  # configured now
    assert app.configured  # type: ignore[attr-defined]
    beat.install(app)
    assert_entries(app.conf.beat_schedule, check_interval)


def test_entries_survive_a_configuration_reload(check_interval: float) -> None:
    app = new_app()
    beat.install(app)
    assert beat.DETECT_ENTRY in app.conf.beat_schedule
    user_entry = {"task": "myapp.tasks.nightly", "schedule": timedelta(days=1)}
    app.config_from_object({"broker_url": "memory://", "beat_schedule": {"nightly": user_entry}})
    schedule = app.conf.beat_schedule
    assert schedule["nightly"] == user_entry
    assert_entries(schedule, check_interval)


def test_the_users_own_entry_of_the_same_name_wins(check_interval: float) -> None:
    own = {"task": DETECT_TASK, "schedule": timedelta(seconds=60)}
    app = new_app({"broker_url": "memory://", "beat_schedule": {beat.DETECT_ENTRY: own}})
    beat.install(app)
    assert app.conf.beat_schedule[beat.DETECT_ENTRY] == own
    assert beat.PRUNE_ENTRY in app.conf.beat_schedule


def test_beat_schedule_false_adds_nothing(check_interval: float, settings: SettingsWrapper) -> None:
    settings.WORKER_HEALTH_BEAT_SCHEDULE = False
    app = new_app()
    beat.install(app)
    assert beat.DETECT_ENTRY not in app.conf.beat_schedule
    assert beat.PRUNE_ENTRY not in app.conf.beat_schedule
    app.config_from_object({"broker_url": "memory://"})  # nor after a reload
    assert app.conf.beat_schedule == {}


def test_install_is_idempotent(check_interval: float) -> None:
    app = new_app()
    beat.install(app)
    beat.install(app)
    receivers = [r for r in app.on_after_configure.receivers or []]
    app.config_from_object({"broker_url": "memory://"})
    assert_entries(app.conf.beat_schedule, check_interval)
    beat.install(app)
    assert len(app.on_after_configure.receivers or []) == len(receivers)


def test_apps_finalized_after_django_started_get_the_entries(check_interval: float) -> None:
    """``install_everywhere`` ran in ``AppConfig.ready()``; a Celery app made later gets
    the entries when it is finalized."""
    app = new_app()
    app.finalize()
    assert_entries(app.conf.beat_schedule, check_interval)


def test_the_example_projects_app_has_the_entries(check_interval: float) -> None:
    from example_project.celery import app

    schedule = app.conf.beat_schedule
    assert schedule[beat.DETECT_ENTRY]["task"] == DETECT_TASK
    assert schedule[beat.PRUNE_ENTRY]["task"] == PRUNE_TASK
    assert DETECT_TASK in app.tasks
    assert PRUNE_TASK in app.tasks

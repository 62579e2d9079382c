"""worker_health.conf: settings read lazily, with defaults derived from HEARTBEAT_INTERVAL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from worker_health.conf import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_RECLAIMS,
    DEFAULT_RETENTION,
    Settings,
    positive_number,
)
from worker_health.conf import settings as wh_settings

#: pytest-django's ``settings`` fixture (its class was renamed between releases)
SettingsWrapper = Any

NAMES = (
    "HEARTBEAT_INTERVAL",
    "STALE_AFTER",
    "CHECK_INTERVAL",
    "BEAT_SCHEDULE",
    "MAX_RECLAIMS",
    "TRACK_TASKS",
    "RETENTION",
)


@pytest.fixture
def clean(settings: SettingsWrapper) -> SettingsWrapper:
    """The Django settings with no WORKER_HEALTH_* value at all (the environment of the
    example project may set some)."""
    for name in NAMES:
        if hasattr(settings, f"WORKER_HEALTH_{name}"):
            delattr(settings, f"WORKER_HEALTH_{name}")
    return settings


def test_defaults(clean: SettingsWrapper) -> None:
    assert wh_settings.HEARTBEAT_INTERVAL == DEFAULT_HEARTBEAT_INTERVAL == 30.0
    assert wh_settings.STALE_AFTER == 60.0
    assert wh_settings.CHECK_INTERVAL == 30.0
    assert wh_settings.BEAT_SCHEDULE is True
    assert wh_settings.MAX_RECLAIMS == DEFAULT_MAX_RECLAIMS == 3
    assert wh_settings.TRACK_TASKS is None
    assert wh_settings.RETENTION == DEFAULT_RETENTION == timedelta(days=7)
    assert wh_settings.OUTAGE_GAP == wh_settings.STALE_AFTER


def test_values_follow_every_change_of_the_settings(clean: SettingsWrapper) -> None:
    assert wh_settings.HEARTBEAT_INTERVAL == 30.0
    clean.WORKER_HEALTH_HEARTBEAT_INTERVAL = 5
    assert wh_settings.HEARTBEAT_INTERVAL == 5.0
    assert wh_settings.STALE_AFTER == 10.0  # derived values too
    with override_settings(WORKER_HEALTH_HEARTBEAT_INTERVAL=7):
        assert wh_settings.HEARTBEAT_INTERVAL == 7.0
        assert wh_settings.STALE_AFTER == 14.0
    assert wh_settings.HEARTBEAT_INTERVAL == 5.0
    assert wh_settings.STALE_AFTER == 10.0


def test_a_value_is_kept_until_a_setting_changes(
    clean: SettingsWrapper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read once (several are read for every task), then kept: Django's settings are not
    asked again until ``setting_changed`` says a WORKER_HEALTH_* setting changed."""
    clean.WORKER_HEALTH_TRACK_TASKS = ["app.*"]
    assert wh_settings.TRACK_TASKS == ("app.*",)
    reads: list[str] = []
    original = Settings.raw

    def counting(self: Settings, name: str, default: Any = None) -> Any:
        reads.append(name)
        return original(self, name, default)

    monkeypatch.setattr(Settings, "raw", counting)
    for _ in range(3):
        assert wh_settings.TRACK_TASKS == ("app.*",)
    assert reads == []
    with override_settings(LANGUAGE_CODE="fr"):  # not ours: nothing is read again
        assert wh_settings.TRACK_TASKS == ("app.*",)
    assert reads == []
    clean.WORKER_HEALTH_TRACK_TASKS = ["other.*"]
    assert wh_settings.TRACK_TASKS == ("other.*",)
    assert reads == ["TRACK_TASKS"]


def test_an_invalid_value_is_never_kept(clean: SettingsWrapper) -> None:
    clean.WORKER_HEALTH_MAX_RECLAIMS = -1
    for _ in range(2):
        with pytest.raises(ImproperlyConfigured):
            wh_settings.MAX_RECLAIMS  # noqa: B018


def test_a_fresh_settings_object_sees_the_same_values(clean: SettingsWrapper) -> None:
    clean.WORKER_HEALTH_MAX_RECLAIMS = 9
    assert Settings().MAX_RECLAIMS == 9


def test_derived_defaults_follow_heartbeat_interval(clean: SettingsWrapper) -> None:
    clean.WORKER_HEALTH_HEARTBEAT_INTERVAL = 10
    assert wh_settings.STALE_AFTER == 20.0
    assert wh_settings.CHECK_INTERVAL == 10.0
    assert wh_settings.OUTAGE_GAP == 20.0


def test_explicit_values_win_over_derived_ones(clean: SettingsWrapper) -> None:
    clean.WORKER_HEALTH_HEARTBEAT_INTERVAL = 10
    clean.WORKER_HEALTH_STALE_AFTER = 45
    clean.WORKER_HEALTH_CHECK_INTERVAL = 4
    assert wh_settings.STALE_AFTER == 45.0
    assert wh_settings.CHECK_INTERVAL == 4.0
    assert wh_settings.OUTAGE_GAP == 45.0


def test_floats_allowed(clean: SettingsWrapper) -> None:
    clean.WORKER_HEALTH_HEARTBEAT_INTERVAL = 0.5
    assert wh_settings.HEARTBEAT_INTERVAL == 0.5
    assert wh_settings.STALE_AFTER == 1.0
    assert wh_settings.CHECK_INTERVAL == 0.5
    clean.WORKER_HEALTH_STALE_AFTER = 1.25
    assert wh_settings.STALE_AFTER == 1.25
    assert isinstance(wh_settings.HEARTBEAT_INTERVAL, float)


def test_heartbeat_retry_max_is_bounded(clean: SettingsWrapper) -> None:
    clean.WORKER_HEALTH_HEARTBEAT_INTERVAL = 30
    assert wh_settings.HEARTBEAT_RETRY_MAX == 2.0
    clean.WORKER_HEALTH_HEARTBEAT_INTERVAL = 1
    assert wh_settings.HEARTBEAT_RETRY_MAX == 0.5
    clean.WORKER_HEALTH_HEARTBEAT_INTERVAL = 0.01
    assert wh_settings.HEARTBEAT_RETRY_MAX == 0.05


@pytest.mark.parametrize("name", ["HEARTBEAT_INTERVAL", "STALE_AFTER", "CHECK_INTERVAL"])
@pytest.mark.parametrize(
    "value", [0, -1, -0.5, "30", None, True, False, float("nan"), float("inf"), [30]]
)
def test_invalid_seconds_raise(clean: SettingsWrapper, name: str, value: Any) -> None:
    setattr(clean, f"WORKER_HEALTH_{name}", value)
    with pytest.raises(ImproperlyConfigured, match=f"WORKER_HEALTH_{name}"):
        getattr(wh_settings, name)


def test_invalid_heartbeat_breaks_the_derived_defaults(clean: SettingsWrapper) -> None:
    clean.WORKER_HEALTH_HEARTBEAT_INTERVAL = -3
    with pytest.raises(ImproperlyConfigured, match="HEARTBEAT_INTERVAL"):
        wh_settings.STALE_AFTER  # noqa: B018
    with pytest.raises(ImproperlyConfigured, match="HEARTBEAT_INTERVAL"):
        wh_settings.CHECK_INTERVAL  # noqa: B018


@pytest.mark.parametrize("value", [0, 1, 10])
def test_max_reclaims_valid(clean: SettingsWrapper, value: int) -> None:
    clean.WORKER_HEALTH_MAX_RECLAIMS = value
    assert value == wh_settings.MAX_RECLAIMS


@pytest.mark.parametrize("value", [-1, 2.5, "3", None, True])
def test_max_reclaims_invalid(clean: SettingsWrapper, value: Any) -> None:
    clean.WORKER_HEALTH_MAX_RECLAIMS = value
    with pytest.raises(ImproperlyConfigured, match="WORKER_HEALTH_MAX_RECLAIMS"):
        wh_settings.MAX_RECLAIMS  # noqa: B018


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("__all__", None),
        (["a.*", "critical"], ("a.*", "critical")),
        (("x",), ("x",)),
        ([], ()),
    ],
)
def test_track_tasks_valid(clean: SettingsWrapper, value: Any, expected: Any) -> None:
    clean.WORKER_HEALTH_TRACK_TASKS = value
    assert expected == wh_settings.TRACK_TASKS


@pytest.mark.parametrize("value", ["myapp.tasks.*", 3, {"a": 1}.keys()])
def test_track_tasks_invalid(clean: SettingsWrapper, value: Any) -> None:
    clean.WORKER_HEALTH_TRACK_TASKS = value
    with pytest.raises(ImproperlyConfigured, match="WORKER_HEALTH_TRACK_TASKS"):
        wh_settings.TRACK_TASKS  # noqa: B018


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (timedelta(hours=2), timedelta(hours=2)),
        (3600, timedelta(hours=1)),
        (0.5, timedelta(milliseconds=500)),
    ],
)
def test_retention_valid(clean: SettingsWrapper, value: Any, expected: timedelta) -> None:
    clean.WORKER_HEALTH_RETENTION = value
    assert expected == wh_settings.RETENTION


@pytest.mark.parametrize("value", [timedelta(0), timedelta(days=-1), 0, -5, "7d", None])
def test_retention_invalid(clean: SettingsWrapper, value: Any) -> None:
    clean.WORKER_HEALTH_RETENTION = value
    with pytest.raises(ImproperlyConfigured, match="WORKER_HEALTH_RETENTION"):
        wh_settings.RETENTION  # noqa: B018


@pytest.mark.parametrize(("value", "expected"), [(False, False), (True, True), (0, False)])
def test_beat_schedule(clean: SettingsWrapper, value: Any, expected: bool) -> None:
    clean.WORKER_HEALTH_BEAT_SCHEDULE = value
    assert wh_settings.BEAT_SCHEDULE is expected


def test_is_set_and_raw(clean: SettingsWrapper) -> None:
    assert not wh_settings.is_set("STALE_AFTER")
    clean.WORKER_HEALTH_STALE_AFTER = 12
    assert wh_settings.is_set("STALE_AFTER")
    assert wh_settings.raw("STALE_AFTER") == 12
    assert wh_settings.raw("NOT_A_SETTING", "fallback") == "fallback"


def test_reading_never_writes_the_users_settings(clean: SettingsWrapper) -> None:
    from django.conf import settings as django_settings

    for name in NAMES:
        getattr(wh_settings, name)
    for name in NAMES:
        assert not hasattr(django_settings, f"WORKER_HEALTH_{name}")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, 1.0),
        (0.25, 0.25),
        (0, None),
        (-1, None),
        (True, None),
        ("1", None),
        (float("nan"), None),
        (float("inf"), None),
        (None, None),
    ],
)
def test_positive_number(value: Any, expected: float | None) -> None:
    assert positive_number(value) == expected

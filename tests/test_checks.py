"""worker_health.checks: every check id fires for bad values, and only for bad values."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from worker_health.checks import check_settings, on_worker_init

ROOT = Path(__file__).resolve().parent.parent

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
    for name in NAMES:
        if hasattr(settings, f"WORKER_HEALTH_{name}"):
            delattr(settings, f"WORKER_HEALTH_{name}")
    return settings


def ids() -> list[str]:
    return sorted(m.id or "" for m in check_settings())


def configure(settings: SettingsWrapper, values: dict[str, Any]) -> None:
    for name, value in values.items():
        setattr(settings, f"WORKER_HEALTH_{name}", value)


# Each case: settings -> the exact set of ids it must produce.
BAD = [
    pytest.param({"HEARTBEAT_INTERVAL": 0}, ["worker_health.E001"], id="E001-zero"),
    pytest.param({"HEARTBEAT_INTERVAL": -5}, ["worker_health.E001"], id="E001-negative"),
    pytest.param({"HEARTBEAT_INTERVAL": "30"}, ["worker_health.E001"], id="E001-string"),
    pytest.param({"HEARTBEAT_INTERVAL": float("nan")}, ["worker_health.E001"], id="E001-nan"),
    pytest.param({"STALE_AFTER": 0}, ["worker_health.E002"], id="E002-zero"),
    pytest.param({"STALE_AFTER": None}, ["worker_health.E002"], id="E002-none"),
    pytest.param({"CHECK_INTERVAL": -1}, ["worker_health.E003"], id="E003-negative"),
    pytest.param({"CHECK_INTERVAL": True}, ["worker_health.E003"], id="E003-bool"),
    pytest.param(
        {"HEARTBEAT_INTERVAL": 0, "STALE_AFTER": "x", "CHECK_INTERVAL": -1},
        ["worker_health.E001", "worker_health.E002", "worker_health.E003"],
        id="E001-E002-E003",
    ),
    pytest.param(
        {"HEARTBEAT_INTERVAL": 10, "STALE_AFTER": 10, "CHECK_INTERVAL": 5},
        ["worker_health.E004"],
        id="E004-equal",
    ),
    pytest.param(
        {"HEARTBEAT_INTERVAL": 10, "STALE_AFTER": 5, "CHECK_INTERVAL": 1},
        ["worker_health.E004"],
        id="E004-smaller",
    ),
    pytest.param(
        {"STALE_AFTER": 20},
        ["worker_health.E004", "worker_health.E005"],
        id="E004-E005-default-heartbeat",
    ),
    pytest.param(
        {"HEARTBEAT_INTERVAL": 10, "CHECK_INTERVAL": 20}, ["worker_health.E005"], id="E005-equal"
    ),
    pytest.param(
        {"HEARTBEAT_INTERVAL": 10, "CHECK_INTERVAL": 25}, ["worker_health.E005"], id="E005-larger"
    ),
    pytest.param(
        {"HEARTBEAT_INTERVAL": 10, "STALE_AFTER": 15, "CHECK_INTERVAL": 5},
        ["worker_health.W001"],
        id="W001",
    ),
    pytest.param({"BEAT_SCHEDULE": "yes"}, ["worker_health.E006"], id="E006-string"),
    pytest.param({"BEAT_SCHEDULE": 1}, ["worker_health.E006"], id="E006-int"),
    pytest.param({"BEAT_SCHEDULE": None}, ["worker_health.E006"], id="E006-none"),
    pytest.param({"MAX_RECLAIMS": -1}, ["worker_health.E007"], id="E007-negative"),
    pytest.param({"MAX_RECLAIMS": 1.5}, ["worker_health.E007"], id="E007-float"),
    pytest.param({"MAX_RECLAIMS": "3"}, ["worker_health.E007"], id="E007-string"),
    pytest.param({"TRACK_TASKS": "myapp.*"}, ["worker_health.E008"], id="E008-string"),
    pytest.param({"TRACK_TASKS": 5}, ["worker_health.E008"], id="E008-int"),
    pytest.param({"RETENTION": 0}, ["worker_health.E009"], id="E009-zero"),
    pytest.param({"RETENTION": timedelta(seconds=-1)}, ["worker_health.E009"], id="E009-neg"),
    pytest.param({"RETENTION": "7 days"}, ["worker_health.E009"], id="E009-string"),
]

GOOD = [
    pytest.param({}, id="defaults"),
    pytest.param({"HEARTBEAT_INTERVAL": 10}, id="heartbeat-only"),
    pytest.param({"HEARTBEAT_INTERVAL": 0.5}, id="sub-second-heartbeat"),
    pytest.param({"HEARTBEAT_INTERVAL": 1, "STALE_AFTER": 3, "CHECK_INTERVAL": 1}, id="fast"),
    pytest.param(
        {"HEARTBEAT_INTERVAL": 10, "STALE_AFTER": 20, "CHECK_INTERVAL": 19.5},
        id="check-just-below-stale",
    ),
    pytest.param({"STALE_AFTER": 120}, id="stale-only"),
    pytest.param({"BEAT_SCHEDULE": False}, id="no-beat"),
    pytest.param({"BEAT_SCHEDULE": True}, id="beat"),
    pytest.param({"MAX_RECLAIMS": 0}, id="no-reclaims"),
    pytest.param({"TRACK_TASKS": ["myapp.*", "critical"]}, id="track-list"),
    pytest.param({"TRACK_TASKS": "__all__"}, id="track-all"),
    pytest.param({"TRACK_TASKS": None}, id="track-none"),
    pytest.param({"RETENTION": timedelta(hours=1)}, id="retention-timedelta"),
    pytest.param({"RETENTION": 3600}, id="retention-seconds"),
]


@pytest.mark.parametrize(("values", "expected"), BAD)
def test_bad_values_fire_exactly_their_ids(
    clean: SettingsWrapper, values: dict[str, Any], expected: list[str]
) -> None:
    configure(clean, values)
    assert ids() == sorted(expected)


@pytest.mark.parametrize("values", GOOD)
def test_good_values_fire_nothing(clean: SettingsWrapper, values: dict[str, Any]) -> None:
    configure(clean, values)
    assert check_settings() == []


def test_messages_have_hints_and_name_the_setting(clean: SettingsWrapper) -> None:
    configure(clean, {"HEARTBEAT_INTERVAL": -1, "MAX_RECLAIMS": -2})
    messages = check_settings()
    assert messages
    for message in messages:
        assert message.hint
        assert "WORKER_HEALTH_" in message.msg
        assert message.is_serious()


def test_w001_is_a_warning_not_an_error(clean: SettingsWrapper) -> None:
    configure(clean, {"HEARTBEAT_INTERVAL": 10, "STALE_AFTER": 15, "CHECK_INTERVAL": 5})
    (message,) = check_settings()
    assert message.id == "worker_health.W001"
    assert not message.is_serious()


ERRORS = [p for p in BAD if p.id != "W001"]


@pytest.mark.parametrize(("values", "expected"), ERRORS)
def test_manage_py_check_fails_with_the_ids(
    clean: SettingsWrapper, values: dict[str, Any], expected: list[str]
) -> None:
    configure(clean, values)
    with pytest.raises(SystemCheckError) as excinfo:
        call_command("check", stdout=StringIO(), stderr=StringIO())
    for expected_id in expected:
        assert expected_id in str(excinfo.value)


def test_manage_py_check_passes_with_good_settings(clean: SettingsWrapper) -> None:
    configure(clean, {"HEARTBEAT_INTERVAL": 1, "STALE_AFTER": 3, "CHECK_INTERVAL": 1})
    out = StringIO()
    call_command("check", stdout=out, stderr=StringIO())
    assert "no issues" in out.getvalue()


def test_manage_py_check_reports_w001_and_fails_at_warning_level(
    clean: SettingsWrapper,
) -> None:
    configure(clean, {"HEARTBEAT_INTERVAL": 10, "STALE_AFTER": 15, "CHECK_INTERVAL": 5})
    err = StringIO()
    call_command("check", stdout=StringIO(), stderr=err)
    assert "worker_health.W001" in err.getvalue()
    with pytest.raises(SystemCheckError, match=r"worker_health\.W001"):
        call_command("check", fail_level="WARNING", stdout=StringIO(), stderr=StringIO())


def test_checks_are_registered_under_the_worker_health_tag(clean: SettingsWrapper) -> None:
    configure(clean, {"MAX_RECLAIMS": -1})
    with pytest.raises(SystemCheckError, match=r"worker_health\.E007"):
        call_command("check", tag=["worker_health"], stdout=StringIO(), stderr=StringIO())


def test_worker_init_refuses_to_start_misconfigured(clean: SettingsWrapper) -> None:
    configure(clean, {"HEARTBEAT_INTERVAL": 10, "STALE_AFTER": 5})
    with pytest.raises(ImproperlyConfigured, match=r"worker_health\.E004"):
        on_worker_init()


def test_worker_init_starts_with_a_warning_only(clean: SettingsWrapper) -> None:
    configure(clean, {"HEARTBEAT_INTERVAL": 10, "STALE_AFTER": 15, "CHECK_INTERVAL": 5})
    on_worker_init()  # W001 alone must not stop a worker


def test_real_manage_py_check_exits_non_zero() -> None:
    """The same through the real ``manage.py`` of the example project, as a process."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "example_project.settings",
        "WORKER_HEALTH_HEARTBEAT_INTERVAL": "10",
        "WORKER_HEALTH_STALE_AFTER": "5",
    }
    env.pop("WORKER_HEALTH_CHECK_INTERVAL", None)
    proc = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "worker_health.E004" in proc.stderr + proc.stdout

    env["WORKER_HEALTH_STALE_AFTER"] = "25"
    proc = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_all_problems_are_reported_in_one_run(clean: SettingsWrapper) -> None:
    configure(clean, {"HEARTBEAT_INTERVAL": 0, "MAX_RECLAIMS": -1, "BEAT_SCHEDULE": "yes"})
    assert ids() == ["worker_health.E001", "worker_health.E006", "worker_health.E007"]

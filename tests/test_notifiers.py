"""Alerts: one per failure or quarantine, deduplicated, rate-limited into a summary, never
in the way of detection and reclamation."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import django
import pytest
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.db.models.functions import Now

from tests.dashboard_data import make_task, make_worker
from worker_health import checks, notifiers, publish, reclaim
from worker_health.conf import settings as wh_settings
from worker_health.models import DetectorState, EventKind, TaskQueue, WorkerEvent
from worker_health.notifiers import (
    Alert,
    AlertDispatcher,
    EmailNotifier,
    LoggingNotifier,
    WebhookNotifier,
)
from worker_health.querysets import db_now_minus
from worker_health.signals import task_quarantined, worker_failed, worker_recovered

RECORDER = "tests.test_notifiers.RecordingNotifier"


class RecordingNotifier(notifiers.Notifier):
    sent: list[Alert] = []

    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    def send(self, alert: Alert) -> None:
        RecordingNotifier.sent.append(alert)


class BrokenNotifier(notifiers.Notifier):
    def send(self, alert: Alert) -> None:
        raise RuntimeError("smtp is down")


class SlowNotifier(notifiers.Notifier):
    def send(self, alert: Alert) -> None:
        time.sleep(1.5)
        RecordingNotifier.sent.append(alert)


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    RecordingNotifier.sent = []
    yield
    RecordingNotifier.sent = []


@pytest.fixture
def clock() -> list[float]:
    return [1000.0]


@pytest.fixture
def sync_dispatcher(monkeypatch: pytest.MonkeyPatch, clock: list[float]) -> AlertDispatcher:
    """Delivers in the caller's thread with a fake clock (the rate-limit logic is the same)."""
    dispatcher = AlertDispatcher(background=False, clock=lambda: clock[0])
    monkeypatch.setattr(notifiers, "dispatcher", dispatcher)
    return dispatcher


def alert(n: int = 1, kind: str = "worker_failed", key: str | None = None) -> Alert:
    return Alert(
        kind=kind,
        subject=f"worker w{n} failed",
        message="...",
        worker_id=f"w{n}@h",
        key=f"{kind}:w{n}" if key is None else key,
    )


def alert_events() -> list[WorkerEvent]:
    return list(WorkerEvent.objects.filter(kind=EventKind.ALERT_SENT).order_by("id"))


# --------------------------------------------------------------------------------------------
# the dispatcher


@pytest.mark.django_db
def test_an_alert_reaches_every_notifier_and_is_logged_as_an_event(
    settings: Any, sync_dispatcher: AlertDispatcher
) -> None:
    settings.WORKER_HEALTH_NOTIFIERS = [RECORDER, {"class": RECORDER, "tag": "second"}]
    sync_dispatcher.submit(alert(1))
    assert [a.subject for a in RecordingNotifier.sent] == ["worker w1 failed"] * 2
    [ev] = alert_events()
    assert ev.worker_name == "w1@h"
    assert ev.details["alert"] == "worker_failed"
    assert ev.details["delivered"] == ["RecordingNotifier", "RecordingNotifier"]
    assert ev.details["failed"] == {}


@pytest.mark.django_db
def test_the_same_transition_alerts_once(settings: Any, sync_dispatcher: AlertDispatcher) -> None:
    settings.WORKER_HEALTH_NOTIFIERS = [RECORDER]
    sync_dispatcher.submit(alert(1))
    sync_dispatcher.submit(alert(1))
    sync_dispatcher.submit(alert(2))
    assert [a.worker_id for a in RecordingNotifier.sent] == ["w1@h", "w2@h"]
    assert len(alert_events()) == 2


@pytest.mark.django_db
def test_a_mass_failure_is_folded_into_one_summary(
    settings: Any, sync_dispatcher: AlertDispatcher, clock: list[float]
) -> None:
    settings.WORKER_HEALTH_NOTIFIERS = [RECORDER]
    settings.WORKER_HEALTH_ALERT_RATE_LIMIT = 3
    settings.WORKER_HEALTH_ALERT_WINDOW = 60
    for n in range(10):
        sync_dispatcher.submit(alert(n))
    sync_dispatcher.submit(alert(99, kind="task_quarantined"))
    assert len(RecordingNotifier.sent) == 3
    clock[0] += 30
    sync_dispatcher.tick()
    assert len(RecordingNotifier.sent) == 3  # the window is not over yet
    clock[0] += 31
    sync_dispatcher.tick()
    summary = RecordingNotifier.sent[-1]
    assert len(RecordingNotifier.sent) == 4
    assert summary.kind == "summary"
    assert summary.subject == (
        "8 more worker health alerts: quarantined tasks: 1, failed workers: 7"
    )
    assert summary.details["folded"] == 8
    assert "worker w9 failed" in summary.message
    events = alert_events()
    assert len(events) == 4 and events[-1].details["folded"] == 8
    # a new window: alerts flow again
    sync_dispatcher.submit(alert(100))
    assert RecordingNotifier.sent[-1].worker_id == "w100@h"


@pytest.mark.django_db
def test_flush_sends_the_pending_summary(settings: Any, sync_dispatcher: AlertDispatcher) -> None:
    settings.WORKER_HEALTH_NOTIFIERS = [RECORDER]
    settings.WORKER_HEALTH_ALERT_RATE_LIMIT = 1
    sync_dispatcher.submit(alert(1))
    sync_dispatcher.submit(alert(2))
    assert sync_dispatcher.flush()
    assert [a.kind for a in RecordingNotifier.sent] == ["worker_failed", "summary"]


@pytest.mark.django_db
def test_a_failing_notifier_does_not_stop_the_others(
    settings: Any, sync_dispatcher: AlertDispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    settings.WORKER_HEALTH_NOTIFIERS = [
        "tests.test_notifiers.BrokenNotifier",
        "no.such.Notifier",
        RECORDER,
    ]
    sync_dispatcher.submit(alert(1))
    assert len(RecordingNotifier.sent) == 1
    [ev] = alert_events()
    assert ev.details["delivered"] == ["RecordingNotifier"]
    assert ev.details["failed"] == {"BrokenNotifier": "RuntimeError: smtp is down"}
    assert "notifier BrokenNotifier failed" in caplog.text
    assert "cannot build notifier no.such.Notifier" in caplog.text


def test_an_exception_inside_the_dispatcher_is_swallowed(
    settings: Any, sync_dispatcher: AlertDispatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.WORKER_HEALTH_NOTIFIERS = [RECORDER]

    def explode(*_: Any) -> None:
        raise RuntimeError("database gone")

    monkeypatch.setattr(notifiers, "record_alert_sent", explode)
    sync_dispatcher.submit(alert(1))  # does not raise
    assert len(RecordingNotifier.sent) == 1


# --------------------------------------------------------------------------------------------
# from the signals


@pytest.mark.django_db
def test_no_notifiers_means_no_alerts_and_no_events(
    settings: Any, sync_dispatcher: AlertDispatcher
) -> None:
    w = make_worker("a@h", status="failed")
    worker_failed.send_robust(sender=type(w), worker=w, last_heartbeat=w.last_heartbeat)
    assert alert_events() == []


@pytest.mark.django_db
def test_signals_raise_alerts_for_alert_on_only(
    settings: Any, sync_dispatcher: AlertDispatcher
) -> None:
    settings.WORKER_HEALTH_NOTIFIERS = [RECORDER]
    w = make_worker("gamma@web-3", status="failed")
    worker_failed.send_robust(sender=type(w), worker=w, last_heartbeat=w.last_heartbeat)
    worker_recovered.send_robust(sender=type(w), worker=w)  # not in the default ALERT_ON
    task = make_task("q-1", status="quarantined", reclaim_count=3, lost_on=["gamma@web-3"] * 3)
    task_quarantined.send_robust(sender=type(task), task=task, worker_id="gamma@web-3")
    task_quarantined.send_robust(sender=type(task), task=None, worker_id="gamma@web-3")
    kinds = [a.kind for a in RecordingNotifier.sent]
    assert kinds == ["worker_failed", "task_quarantined", "task_quarantined"]
    failed_alert, quarantine_alert, _ = RecordingNotifier.sent
    assert failed_alert.subject == "Celery worker gamma@web-3 failed"
    assert "host web-3, pid 4242" in failed_alert.message
    assert quarantine_alert.subject == "Task demo.tasks.work[q-1] quarantined"
    assert "gamma@web-3 (3x)" in quarantine_alert.message
    settings.WORKER_HEALTH_ALERT_ON = ["worker_recovered"]
    worker_recovered.send_robust(sender=type(w), worker=w)
    assert RecordingNotifier.sent[-1].subject == "Celery worker gamma@web-3 recovered"


@pytest.mark.django_db
def test_one_alert_per_worker_failure_not_per_sweep(
    settings: Any, sync_dispatcher: AlertDispatcher
) -> None:
    settings.WORKER_HEALTH_NOTIFIERS = [RECORDER]
    DetectorState.objects.create(pk=1, observing_since=db_now_minus(3600), last_sweep_at=Now())
    make_worker("dead@h", heartbeat_age=600)
    make_worker("alive@h", heartbeat_age=1)
    assert reclaim.fail_stale_workers() == ["dead@h"]
    assert reclaim.fail_stale_workers() == []  # the next sweep: already failed
    assert [a.worker_id for a in RecordingNotifier.sent] == ["dead@h"]
    assert len(alert_events()) == 1


@pytest.mark.django_db(transaction=True)
def test_a_slow_notifier_does_not_delay_detection(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real, background dispatcher: the sweep returns at once; the alert follows."""
    settings.WORKER_HEALTH_NOTIFIERS = ["tests.test_notifiers.SlowNotifier"]
    dispatcher = AlertDispatcher()
    monkeypatch.setattr(notifiers, "dispatcher", dispatcher)
    DetectorState.objects.create(pk=1, observing_since=db_now_minus(3600), last_sweep_at=Now())
    make_worker("dead@h", heartbeat_age=600)
    started = time.monotonic()
    assert reclaim.fail_stale_workers() == ["dead@h"]
    assert time.monotonic() - started < 1.0
    assert RecordingNotifier.sent == []
    assert dispatcher.flush(timeout=10)
    assert [a.worker_id for a in RecordingNotifier.sent] == ["dead@h"]
    [ev] = alert_events()
    assert ev.details["delivered"] == ["SlowNotifier"]


@pytest.mark.django_db(transaction=True)
def test_a_failing_notifier_does_not_break_reclamation(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.WORKER_HEALTH_NOTIFIERS = ["tests.test_notifiers.BrokenNotifier"]
    settings.WORKER_HEALTH_MAX_RECLAIMS = 0
    dispatcher = AlertDispatcher()
    monkeypatch.setattr(notifiers, "dispatcher", dispatcher)
    monkeypatch.setattr(publish, "republish", lambda task: None)
    dead = make_worker("dead@h", status="failed")
    make_task("doomed", worker=dead)
    outcome = reclaim.reclaim_tasks_of(dead, reason="worker failed")
    assert outcome.quarantined == ["doomed"]
    assert TaskQueue.objects.get(task_id="doomed").status == "quarantined"
    assert dispatcher.flush(timeout=10)
    [ev] = alert_events()
    assert ev.task_id == "doomed" and "BrokenNotifier" in ev.details["failed"]


def test_every_signal_has_a_receiver_with_a_dispatch_uid() -> None:
    from worker_health import signals

    for signal, _receiver, uid in notifiers.signal_receivers():
        assert signal is getattr(signals, uid)
        keys = [entry[0][0] for entry in signal.receivers]  # ((uid, sender id), receiver...)
        assert f"worker_health.alerts.{uid}" in keys, uid


# --------------------------------------------------------------------------------------------
# the built-in notifiers


def test_email_notifier_mails_the_admins(settings: Any) -> None:
    # Django 6.0 takes plain addresses; older versions want (name, address) pairs.
    settings.ADMINS = (
        ["ops@example.com"] if django.VERSION >= (6, 0) else [("Ops", "ops@example.com")]
    )
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    EmailNotifier().send(alert(1))
    [message] = mail.outbox
    assert message.to == ["ops@example.com"]
    assert message.subject.endswith("worker w1 failed")


def test_logging_notifier_logs_at_the_chosen_level(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ops.alerts"):
        LoggingNotifier(logger="ops.alerts", level="error").send(alert(1))
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "worker w1 failed: ..."
    with pytest.raises(ValueError):
        LoggingNotifier(level="LOUD")


class Hook(BaseHTTPRequestHandler):
    """Answers with the next status of ``statuses`` and records the bodies."""

    statuses: list[int] = []
    bodies: list[dict[str, Any]] = []
    delay = 0.0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.bodies.append(json.loads(body))
        time.sleep(Hook.delay)
        self.send_response(Hook.statuses.pop(0) if Hook.statuses else 200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[str]:
    Hook.statuses, Hook.bodies, Hook.delay = [], [], 0.0
    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/alerts"
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(WebhookNotifier, "sleep", staticmethod(waits.append))
    return waits


def test_webhook_posts_the_alert_as_json(hook: str, no_sleep: list[float]) -> None:
    WebhookNotifier(url=hook, headers={"X-Team": "ops"}).send(alert(1))
    [body] = Hook.bodies
    assert body["kind"] == "worker_failed" and body["worker_id"] == "w1@h"
    assert "key" not in body
    assert no_sleep == []


def test_webhook_retries_server_errors_with_back_off(hook: str, no_sleep: list[float]) -> None:
    Hook.statuses = [503, 500, 200]
    WebhookNotifier(url=hook, retries=3, backoff=0.5).send(alert(1))
    assert len(Hook.bodies) == 3
    assert no_sleep == [0.5, 1.0]


def test_webhook_gives_up_after_its_retries(hook: str, no_sleep: list[float]) -> None:
    Hook.statuses = [500] * 5
    with pytest.raises(Exception, match="500"):
        WebhookNotifier(url=hook, retries=2).send(alert(1))
    assert len(Hook.bodies) == 3


def test_webhook_does_not_retry_client_errors(hook: str, no_sleep: list[float]) -> None:
    Hook.statuses = [400]
    with pytest.raises(Exception, match="400"):
        WebhookNotifier(url=hook, retries=3).send(alert(1))
    assert len(Hook.bodies) == 1


def test_webhook_times_out(hook: str, no_sleep: list[float]) -> None:
    Hook.delay = 1.0
    started = time.monotonic()
    with pytest.raises(Exception, match="timed out"):
        WebhookNotifier(url=hook, timeout=0.2, retries=1).send(alert(1))
    assert time.monotonic() - started < 1.5
    assert no_sleep == [1.0]


@pytest.mark.parametrize(
    "options",
    [{"url": "ftp://x"}, {"url": "https://x", "timeout": 0}, {"url": "https://x", "retries": -1}],
)
def test_webhook_rejects_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        WebhookNotifier(**options)


# --------------------------------------------------------------------------------------------
# settings and checks


def error_ids(settings: Any, **values: Any) -> list[str]:
    for name, value in values.items():
        setattr(settings, f"WORKER_HEALTH_{name}", value)
    return [m.id for m in checks.check_alert_and_endpoint_settings()]


def test_defaults_pass_the_checks(settings: Any) -> None:
    assert checks.check_alert_and_endpoint_settings() == []
    assert wh_settings.NOTIFIERS == ()
    assert frozenset({"worker_failed", "task_quarantined"}) == wh_settings.ALERT_ON
    assert wh_settings.ALERT_RATE_LIMIT == 10
    assert wh_settings.ALERT_WINDOW == 300
    assert wh_settings.API_TOKEN is None
    assert wh_settings.MIN_ACTIVE_WORKERS == 1
    assert wh_settings.READY_PUBLIC is False


def test_notifiers_setting_accepts_paths_and_dicts(settings: Any) -> None:
    settings.WORKER_HEALTH_NOTIFIERS = [
        "worker_health.notifiers.EmailNotifier",
        {"class": "worker_health.notifiers.WebhookNotifier", "url": "https://h", "timeout": 3},
    ]
    assert wh_settings.NOTIFIERS == (
        ("worker_health.notifiers.EmailNotifier", {}),
        ("worker_health.notifiers.WebhookNotifier", {"url": "https://h", "timeout": 3}),
    )
    assert checks.check_alert_and_endpoint_settings() == []


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"NOTIFIERS": "worker_health.notifiers.EmailNotifier"}, ["worker_health.E010"]),
        ({"NOTIFIERS": [{"url": "https://h"}]}, ["worker_health.E010"]),
        ({"NOTIFIERS": ["no.such.Notifier"]}, ["worker_health.E011"]),
        (
            {"NOTIFIERS": [{"class": "worker_health.notifiers.WebhookNotifier"}]},
            ["worker_health.E011"],
        ),
        (
            {"NOTIFIERS": [{"class": "worker_health.notifiers.EmailNotifier", "x": 1}]},
            ["worker_health.E011"],
        ),
        ({"ALERT_ON": ["worker_exploded"]}, ["worker_health.E012"]),
        ({"ALERT_ON": "worker_failed"}, ["worker_health.E012"]),
        ({"ALERT_RATE_LIMIT": 0}, ["worker_health.E013"]),
        ({"ALERT_WINDOW": -5}, ["worker_health.E014"]),
        ({"API_TOKEN": ""}, ["worker_health.E015"]),
        ({"API_TOKEN": 1234}, ["worker_health.E015"]),
        ({"MIN_ACTIVE_WORKERS": -1}, ["worker_health.E016"]),
        ({"READY_PUBLIC": "yes"}, ["worker_health.E017"]),
    ],
)
def test_bad_settings_are_reported(
    settings: Any, values: dict[str, Any], expected: list[str]
) -> None:
    assert error_ids(settings, **values) == expected


def test_the_token_is_never_echoed_by_its_check(settings: Any) -> None:
    settings.WORKER_HEALTH_API_TOKEN = b"bytes-secret"
    [error] = checks.check_alert_and_endpoint_settings()
    assert "bytes-secret" not in error.msg
    with pytest.raises(ImproperlyConfigured):
        _ = wh_settings.API_TOKEN


def test_the_checks_are_registered() -> None:
    from django.core.checks import registry

    assert checks.check_alert_and_endpoint_settings in registry.registry.get_checks()

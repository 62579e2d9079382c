"""System checks for worker_health's settings (``manage.py check``, and every worker start)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from .conf import DEFAULT_HEARTBEAT_INTERVAL, PREFIX, positive_number, settings

_SECONDS_HINT = "Use a number of seconds greater than 0, e.g. 30 or 0.5."


def _number_setting(name: str, error_id: str) -> tuple[float | None, list[checks.CheckMessage]]:
    if not settings.is_set(name):
        return None, []
    value = settings.raw(name)
    number = positive_number(value)
    if number is None:
        return None, [
            checks.Error(
                f"{PREFIX}{name} must be a positive number of seconds, got {value!r}.",
                hint=_SECONDS_HINT,
                id=error_id,
            )
        ]
    return number, []


def _relations(
    heartbeat: float | None, stale: float | None, check: float | None, invalid: bool
) -> list[checks.CheckMessage]:
    """How the three intervals relate; skipped when one of them is invalid already."""
    errors: list[checks.CheckMessage] = []
    if invalid:
        return errors
    heartbeat = heartbeat or DEFAULT_HEARTBEAT_INTERVAL
    stale = stale or 2 * heartbeat
    check = check or heartbeat
    if stale <= heartbeat:
        errors.append(
            checks.Error(
                f"{PREFIX}STALE_AFTER ({stale:g} s) must be greater than "
                f"{PREFIX}HEARTBEAT_INTERVAL ({heartbeat:g} s), or every worker would be "
                "declared failed between two heartbeats.",
                hint="Leave STALE_AFTER unset (it defaults to 2 x HEARTBEAT_INTERVAL) or "
                "set it to at least twice the heartbeat interval.",
                id="worker_health.E004",
            )
        )
    if check >= stale:
        errors.append(
            checks.Error(
                f"{PREFIX}CHECK_INTERVAL ({check:g} s) must be smaller than "
                f"{PREFIX}STALE_AFTER ({stale:g} s): the outage guard treats a pause in "
                "detector sweeps longer than STALE_AFTER as a database outage.",
                hint="Leave CHECK_INTERVAL unset (it defaults to HEARTBEAT_INTERVAL).",
                id="worker_health.E005",
            )
        )
    if stale < 2 * heartbeat and not errors:
        errors.append(
            checks.Warning(
                f"{PREFIX}STALE_AFTER ({stale:g} s) is less than twice "
                f"{PREFIX}HEARTBEAT_INTERVAL ({heartbeat:g} s): one slow heartbeat can get a "
                "live worker declared failed.",
                hint="Use STALE_AFTER >= 2 x HEARTBEAT_INTERVAL.",
                id="worker_health.W001",
            )
        )
    return errors


def check_settings(app_configs: Sequence[Any] | None = None, **_: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    heartbeat, msgs = _number_setting("HEARTBEAT_INTERVAL", "worker_health.E001")
    errors += msgs
    stale, msgs = _number_setting("STALE_AFTER", "worker_health.E002")
    errors += msgs
    check, msgs = _number_setting("CHECK_INTERVAL", "worker_health.E003")
    errors += msgs
    errors += _relations(heartbeat, stale, check, bool(errors))
    if settings.is_set("BEAT_SCHEDULE") and not isinstance(settings.raw("BEAT_SCHEDULE"), bool):
        errors.append(
            checks.Error(
                f"{PREFIX}BEAT_SCHEDULE must be True or False, "
                f"got {settings.raw('BEAT_SCHEDULE')!r}.",
                id="worker_health.E006",
            )
        )
    for name, error_id in (
        ("MAX_RECLAIMS", "worker_health.E007"),
        ("TRACK_TASKS", "worker_health.E008"),
        ("RETENTION", "worker_health.E009"),
    ):
        try:
            getattr(settings, name)
        except ImproperlyConfigured as exc:
            errors.append(checks.Error(str(exc), id=error_id, hint=_HINTS[name]))
    return errors


_HINTS = {
    "MAX_RECLAIMS": "A whole number such as 3; 0 quarantines a task the first time its "
    "worker dies running it.",
    "TRACK_TASKS": "None tracks every task; otherwise a list such as ['myapp.tasks.*', "
    "'critical'] of task-name patterns (fnmatch) and queue names.",
    "RETENTION": "A datetime.timedelta such as timedelta(days=7), or a number of seconds.",
}


def on_worker_init(sender: Any = None, **_: Any) -> None:
    """Stop a worker whose worker_health settings are invalid, with the checks' message.

    Celery's Django fix-up runs Django's checks at start-up but ignores what they return,
    so without this the worker would run half-configured.
    """
    errors = [m for m in check_settings() if m.is_serious()]
    if errors:
        raise ImproperlyConfigured(
            "worker_health is misconfigured:\n" + "\n".join(str(e) for e in errors)
        )


def check_alert_and_endpoint_settings(
    app_configs: Sequence[Any] | None = None, **_: Any
) -> list[checks.CheckMessage]:
    """The alert notifiers and the endpoints' settings (E010 - E016)."""
    from django.utils.module_loading import import_string

    errors: list[checks.CheckMessage] = []
    try:
        specs = settings.NOTIFIERS
    except ImproperlyConfigured as exc:
        specs = ()
        errors.append(checks.Error(str(exc), id="worker_health.E010", hint=_NOTIFIERS_HINT))
    for path, options in specs:
        try:
            notifier_class = import_string(path)
        except ImportError as exc:
            errors.append(
                checks.Error(
                    f"{PREFIX}NOTIFIERS: cannot import {path!r} ({exc}).",
                    hint=_NOTIFIERS_HINT,
                    id="worker_health.E011",
                )
            )
            continue
        try:
            notifier_class(**options)
        except Exception as exc:
            errors.append(
                checks.Error(
                    f"{PREFIX}NOTIFIERS: {path} rejects its options {sorted(options)}: {exc}",
                    hint=_NOTIFIERS_HINT,
                    id="worker_health.E011",
                )
            )
    for name, error_id, hint in (
        ("ALERT_ON", "worker_health.E012", "e.g. ['worker_failed', 'task_quarantined']."),
        ("ALERT_RATE_LIMIT", "worker_health.E013", "A whole number of alerts such as 10."),
        ("ALERT_WINDOW", "worker_health.E014", _SECONDS_HINT),
        (
            "API_TOKEN",
            "worker_health.E015",
            "A long random string, e.g. from "
            "secrets.token_urlsafe(32), read from the environment; or None.",
        ),
        ("MIN_ACTIVE_WORKERS", "worker_health.E016", "A whole number such as 1."),
        ("READY_PUBLIC", "worker_health.E017", "True or False."),
    ):
        try:
            getattr(settings, name)
        except ImproperlyConfigured as exc:
            errors.append(checks.Error(str(exc), id=error_id, hint=hint))
    return errors


_NOTIFIERS_HINT = (
    "A list such as ['worker_health.notifiers.LoggingNotifier', {'class': "
    "'worker_health.notifiers.WebhookNotifier', 'url': 'https://...'}]."
)

"""Adds the detector and the pruner to celery beat's schedule, with no user code.

``beat_schedule`` is read when beat builds its scheduler (Celery's default one and
django-celery-beat's ``DatabaseScheduler`` alike), after Django is set up; the entries are
added to every Celery app when the Django app is ready.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from .conf import settings
from .tasks import DETECT_TASK, PRUNE_TASK

DETECT_ENTRY = "worker-health-detect-failed-workers"
PRUNE_ENTRY = "worker-health-prune-finished-tasks"


def _expiry(seconds: float) -> dict[str, Any]:
    return {"expires": seconds, "expire_seconds": int(seconds)}


def schedule_entries() -> dict[str, dict[str, Any]]:
    return {
        DETECT_ENTRY: {
            "task": DETECT_TASK,
            "schedule": timedelta(seconds=settings.CHECK_INTERVAL),
            # a sweep that could not run in time is pointless later: the next one is due.
            # ``expires`` for Celery's scheduler, ``expire_seconds`` for django-celery-beat's
            # DatabaseScheduler (which drops ``expires``; Celery ignores the other one).
            "options": _expiry(max(10.0, settings.CHECK_INTERVAL * 2)),
        },
        PRUNE_ENTRY: {
            "task": PRUNE_TASK,
            "schedule": timedelta(hours=1),
            "options": _expiry(3600),
        },
    }


def _add_entries(app: Any) -> None:
    if not settings.BEAT_SCHEDULE:
        return
    schedule = app.conf.beat_schedule
    for name, entry in schedule_entries().items():
        schedule.setdefault(name, entry)


def install(app: Any) -> None:
    """Add the entries to ``app``'s ``beat_schedule`` now if it is configured, and again
    whenever its configuration is (re)loaded, unless the user opted out."""
    if getattr(app, "_worker_health_beat", False):
        return
    app._worker_health_beat = True
    app.on_after_configure.connect(lambda sender, **_: _add_entries(sender), weak=False)
    if app.configured:
        _add_entries(app)


def install_everywhere() -> None:
    from celery import _state

    for app in list(_state._get_active_apps()):  # type: ignore[attr-defined]
        install(app)
    _state.connect_on_app_finalize(install)

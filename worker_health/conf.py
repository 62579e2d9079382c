"""The package's settings, read lazily as ``WORKER_HEALTH_<NAME>``.

A value is read on its first access (never at import time) and kept until Django's
``setting_changed`` signal says a ``WORKER_HEALTH_*`` setting changed (connected in
``AppConfig.ready()``), as Django REST framework's ``api_settings`` do: that keeps
``override_settings`` and pytest-django's ``settings`` fixture working, never mutates the
user's settings, and costs a dictionary lookup on the hot path (several of these are read
for every task). Values are validated by the system checks in :mod:`worker_health.checks`;
the accessors here return the values as numbers and raise ``ImproperlyConfigured`` (never
kept) only if a check was skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, Generic, TypeVar, overload

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured

PREFIX = "WORKER_HEALTH_"
_UNSET = object()

DEFAULT_HEARTBEAT_INTERVAL = 30.0
DEFAULT_MAX_RECLAIMS = 3
DEFAULT_RETENTION = timedelta(days=7)


def positive_number(value: Any) -> float | None:
    """Return ``value`` as a float if it is a finite number > 0, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        return None
    return number


T = TypeVar("T")

#: bumped when a WORKER_HEALTH_* setting changes: every kept value is read again
_generation = 0


def reload(*, setting: str = "", **kwargs: Any) -> None:
    """``setting_changed`` receiver: forget the values read so far."""
    global _generation
    if not setting or setting.startswith(PREFIX):
        _generation += 1


class setting(Generic[T]):  # a decorator, as ``property``
    """A ``Settings`` property whose value is kept until the settings change."""

    def __init__(self, compute: Callable[[Settings], T]) -> None:
        self.compute = compute
        self.name = compute.__name__
        self.__doc__ = compute.__doc__

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> setting[T]: ...

    @overload
    def __get__(self, obj: Settings, owner: type | None = None) -> T: ...

    def __get__(self, obj: Settings | None, owner: type | None = None) -> setting[T] | T:
        if obj is None:
            return self
        kept = obj._kept.get(self.name)
        if kept is not None and kept[0] == _generation:
            return kept[1]
        generation = _generation
        value = self.compute(obj)
        obj._kept[self.name] = (generation, value)
        return value


class Settings:
    """Typed view over the ``WORKER_HEALTH_*`` Django settings."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[int, Any]] = {}

    def raw(self, name: str, default: Any = _UNSET) -> Any:
        """The user's value for ``WORKER_HEALTH_<name>``, or ``default``."""
        return getattr(django_settings, PREFIX + name, default)

    def is_set(self, name: str) -> bool:
        return self.raw(name) is not _UNSET

    def _seconds(self, name: str, default: float) -> float:
        value = self.raw(name, default)
        number = positive_number(value)
        if number is None:
            raise ImproperlyConfigured(
                f"{PREFIX}{name} must be a positive number of seconds, got {value!r}"
            )
        return number

    @setting
    def HEARTBEAT_INTERVAL(self) -> float:
        """Seconds between two heartbeats of a worker."""
        return self._seconds("HEARTBEAT_INTERVAL", DEFAULT_HEARTBEAT_INTERVAL)

    @setting
    def STALE_AFTER(self) -> float:
        """Seconds without a heartbeat (by the database's clock) after which a worker failed."""
        return self._seconds("STALE_AFTER", 2 * self.HEARTBEAT_INTERVAL)

    @setting
    def CHECK_INTERVAL(self) -> float:
        """Seconds between two detector sweeps."""
        return self._seconds("CHECK_INTERVAL", self.HEARTBEAT_INTERVAL)

    @setting
    def BEAT_SCHEDULE(self) -> bool:
        """Whether the detector and the pruner are added to celery beat's schedule."""
        return bool(self.raw("BEAT_SCHEDULE", True))

    @setting
    def MAX_RECLAIMS(self) -> int:
        """How many times one task may be reclaimed before it is quarantined."""
        value = self.raw("MAX_RECLAIMS", DEFAULT_MAX_RECLAIMS)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ImproperlyConfigured(
                f"{PREFIX}MAX_RECLAIMS must be a whole number >= 0, got {value!r}"
            )
        return value

    @setting
    def TRACK_TASKS(self) -> tuple[str, ...] | None:
        """Task-name patterns / queue names to track; ``None`` means every task."""
        value = self.raw("TRACK_TASKS", None)
        if value is None or value == "__all__":
            return None
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ImproperlyConfigured(
                f"{PREFIX}TRACK_TASKS must be None, '__all__' or a list of task-name "
                f"patterns / queue names, got {value!r}"
            )
        return tuple(str(item) for item in value)

    @setting
    def RETENTION(self) -> timedelta:
        """How long finished task rows and events are kept."""
        value = self.raw("RETENTION", DEFAULT_RETENTION)
        if isinstance(value, timedelta):
            seconds = value.total_seconds()
        else:
            seconds = positive_number(value) or 0.0
        if seconds <= 0:
            raise ImproperlyConfigured(
                f"{PREFIX}RETENTION must be a positive timedelta or number of seconds, "
                f"got {value!r}"
            )
        return timedelta(seconds=seconds)

    @setting
    def OUTAGE_GAP(self) -> float:
        """A pause in detector sweeps longer than this restarts every worker's grace period.

        See "Outage guard" in the README: after the database (or every detector) was
        unreachable for longer than ``STALE_AFTER``, no worker is failed until the detector
        has again watched it for a full ``STALE_AFTER``.
        """
        return self.STALE_AFTER

    @setting
    def SYNCHRONOUS_COMMIT(self) -> bool:
        """Wait for PostgreSQL's WAL flush on tracking writes (see durability.py)."""
        return bool(self.raw("SYNCHRONOUS_COMMIT", False))

    @setting
    def HEARTBEAT_RETRY_MAX(self) -> float:
        """Longest wait between two heartbeat attempts while the database is unreachable."""
        return max(0.05, min(self.HEARTBEAT_INTERVAL / 2, 2.0))

    # -- alerts and endpoints ------------------------------------------------------------------

    @setting
    def NOTIFIERS(self) -> tuple[tuple[str, dict[str, Any]], ...]:
        """Alert notifiers as ``(dotted path, options)``; none by default.

        Each item is a dotted path, or a dict ``{"class": "dotted.path", **options}``.
        """
        value = self.raw("NOTIFIERS", ())
        if value is None:
            return ()
        if isinstance(value, (str, dict)) or not isinstance(value, Sequence):
            raise ImproperlyConfigured(
                f"{PREFIX}NOTIFIERS must be a list of dotted paths or of dicts with a "
                f"'class' key, got {value!r}"
            )
        specs: list[tuple[str, dict[str, Any]]] = []
        for item in value:
            if isinstance(item, str) and item:
                specs.append((item, {}))
            elif isinstance(item, dict) and isinstance(item.get("class"), str) and item["class"]:
                options = {k: v for k, v in item.items() if k != "class"}
                specs.append((item["class"], options))
            else:
                raise ImproperlyConfigured(
                    f"{PREFIX}NOTIFIERS: each item must be a dotted path or a dict with a "
                    f"'class' key, got {item!r}"
                )
        return tuple(specs)

    @setting
    def ALERT_ON(self) -> frozenset[str]:
        """The signals that raise an alert (names from :mod:`worker_health.signals`)."""
        value = self.raw("ALERT_ON", DEFAULT_ALERT_ON)
        if isinstance(value, str) or not isinstance(value, (Sequence, set, frozenset)):
            raise ImproperlyConfigured(
                f"{PREFIX}ALERT_ON must be a list of signal names, got {value!r}"
            )
        unknown = sorted(str(v) for v in value if v not in ALERT_SIGNALS)
        if unknown:
            raise ImproperlyConfigured(
                f"{PREFIX}ALERT_ON: unknown signal name(s) {', '.join(unknown)}; choose from "
                f"{', '.join(ALERT_SIGNALS)}"
            )
        return frozenset(value)

    @setting
    def ALERT_RATE_LIMIT(self) -> int:
        """At most this many alerts per ``ALERT_WINDOW``; the rest are sent as one summary."""
        value = self.raw("ALERT_RATE_LIMIT", DEFAULT_ALERT_RATE_LIMIT)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ImproperlyConfigured(
                f"{PREFIX}ALERT_RATE_LIMIT must be a whole number >= 1, got {value!r}"
            )
        return value

    @setting
    def ALERT_WINDOW(self) -> float:
        """Seconds of the alert rate limit's window."""
        return self._seconds("ALERT_WINDOW", DEFAULT_ALERT_WINDOW)

    @setting
    def API_TOKEN(self) -> str | None:
        """Bearer token accepted by the JSON and metrics endpoints; ``None`` disables tokens."""
        value = self.raw("API_TOKEN", None)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ImproperlyConfigured(
                f"{PREFIX}API_TOKEN must be a non-empty string or None, got a "
                f"{type(value).__name__}"
            )
        return value

    @setting
    def MIN_ACTIVE_WORKERS(self) -> int:
        """The readiness endpoint answers 200 when at least this many workers are live."""
        value = self.raw("MIN_ACTIVE_WORKERS", 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ImproperlyConfigured(
                f"{PREFIX}MIN_ACTIVE_WORKERS must be a whole number >= 0, got {value!r}"
            )
        return value

    @setting
    def READY_PUBLIC(self) -> bool:
        """Whether the readiness endpoint answers without authentication."""
        value = self.raw("READY_PUBLIC", False)
        if not isinstance(value, bool):
            raise ImproperlyConfigured(f"{PREFIX}READY_PUBLIC must be True or False, got {value!r}")
        return value


#: the signals an alert can be raised on
ALERT_SIGNALS = (
    "worker_registered",
    "worker_failed",
    "worker_recovered",
    "worker_offline",
    "task_reclaimed",
    "task_quarantined",
    "stale_completion",
)
DEFAULT_ALERT_ON = ("worker_failed", "task_quarantined")
DEFAULT_ALERT_RATE_LIMIT = 10
DEFAULT_ALERT_WINDOW = 300.0

settings = Settings()
